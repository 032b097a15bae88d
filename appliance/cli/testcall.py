"""``hotsite testcall``: dial a hotline now, as a customer would, and say what was heard.

For the technician and for scripts after a change: no daemon needed, the same
call code the daemon's scheduled test calls use (monitoring/probes/testcall.py),
exit 0 when the call was answered with audio, 1 otherwise, like ``hotsite probe``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

import click

from appliance import config as config_mod
from appliance.cli.context import Context, fail, pass_ctx
from appliance.errors import ConfigError
from monitoring.probes.testcall import CallSpec


@click.command("testcall")
@click.argument("hotline")
@click.option("--via", "trunk", metavar="TRUNK", help="Dial through this trunk instead of the carrier edge.")
@click.option("--duration", type=click.FloatRange(0.5, 60), help="Seconds of media once answered.")
@click.option("--json", "as_json", is_flag=True, help="Print the call's record as JSON.")
@pass_ctx
def testcall(ctx: Context, hotline: str, trunk: str | None, duration: float | None, as_json: bool) -> None:
    """Place a real test call to HOTLINE (its name or number); exit 0 if answered with audio.

    \b
    The call carries the [testcalls] caller number and an X-Hotsite-Test-Call
    header, so the call centre's reports can leave it out.
    \b
    Examples:
      hotsite testcall vip                 # through the carrier edge ([kamailio] sip)
      hotsite testcall 95566 --via trunk-a # through one carrier trunk
      hotsite testcall vip --json | jq .mos
    """
    from monitoring.probes.testcall import TestCall

    try:
        cfg = config_mod.load(ctx.config_path)
    except ConfigError as exc:
        fail(exc)
    spec = _spec(cfg, hotline, trunk, duration)
    result = asyncio.run(TestCall(spec).run())
    record = result.to_json()
    record["via"] = f"trunk:{trunk}" if trunk else "carrier edge"
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print(record, spec.host, spec.port)
    sys.exit(0 if result.ok else 1)


def _spec(cfg: config_mod.Config, hotline: str, trunk: str | None, duration: float | None) -> CallSpec:
    from monitoring.targets import call_spec

    name = next((n for n, h in cfg.hotlines.items() if hotline in (n, h.number)), None)
    if name is None and not hotline.lstrip("+").isdigit():
        known = ", ".join(f"{n} ({h.number})" for n, h in cfg.hotlines.items()) or "none"
        raise click.BadParameter(
            f"{hotline!r} is no hotline name or number (known: {known})", param_hint="HOTLINE"
        )
    number = cfg.hotlines[name].number if name else hotline
    if trunk is not None:
        if trunk not in cfg.trunks:
            known = ", ".join(cfg.trunks) or "none"
            raise click.BadParameter(f"unknown trunk {trunk!r} (known: {known})", param_hint="--via")
        spec = call_spec(cfg, f"testcall:trunk:{trunk}", number, cfg.trunks[trunk].address)
    elif cfg.kamailio.sip is None:
        raise click.UsageError(
            "no [kamailio] sip in the config: give --via TRUNK, or say where the carrier edge is"
        )
    else:
        spec = call_spec(cfg, f"testcall:{name or number}", number, cfg.kamailio.sip)
    return dataclasses.replace(spec, duration_s=duration) if duration else spec


def _print(r: dict[str, Any], host: str, port: int) -> None:
    head = f"testcall {r['number']} via {r['via']} ({host}:{port})"
    if not r["ok"]:
        click.echo(f"{head}: FAILED: {r['detail']}")
    else:
        click.echo(f"{head}: answered by {r['answered_by']}")
    if r["code"] is not None:
        ringing = f", ringing after {r['pdd_ringing_ms']:.0f} ms" if r["pdd_ringing_ms"] is not None else ""
        answer = f", answered after {r['pdd_answer_ms']:.0f} ms" if r["pdd_answer_ms"] is not None else ""
        click.echo(f"  set-up   {r['status']}{ringing}{answer} (post-dial delay)")
    if r["tx_packets"]:
        loss = f"{r['loss_pct']:.1f}%" if r["loss_pct"] is not None else "n/a"
        jitter = f", jitter {r['jitter_ms']:.1f} ms" if r["jitter_ms"] is not None else ""
        rtt = f", round trip {r['rtt_ms']:.1f} ms" if r["rtt_ms"] is not None else ""
        level = f", level {r['level_dbov']:.1f} dBov" if r["level_dbov"] is not None else ""
        heard = "audio" if r["audio"] else "NO AUDIO"
        heard = "ONE-WAY AUDIO (the far end did not hear us)" if r["reason"] == "one_way" else heard
        received = f"received {r['rx_packets']} (loss {loss})"
        echoed = f" ({r['tx_echoed']} came back)" if r["tx_echoed"] or r["reason"] == "one_way" else ""
        click.echo(f"  media    sent {r['tx_packets']}{echoed}, {received}{jitter}{rtt}{level}: {heard}")
    if r["mos"] is not None:
        click.echo(f"  quality  R {r['r_factor']:.1f}, estimated MOS {r['mos']:.2f} (ITU-T G.107)")
    click.echo(
        f"  hang-up  {r['hangup']}" + (f"; {r['garbage']} stray datagrams ignored" if r["garbage"] else "")
    )
