"""``hotsite witness``: the third vantage point's agent, run at a third place.

Register with ``cli.add_command(witness)`` (``appliance.cli.main``). It needs
no daemon and no ``hotsite.toml``: a witness machine has only this command,
its options or a small TOML file (``--config``, top-level keys named like the
options: ``name``, ``listen``, ``primary = [...]``, ``interval_s``,
``timeout_s``, ``rise``, ``fall``, ``token_file``, ``tls_cert_file``,
``tls_key_file``, ``allow_plain_http``, ``allow_unauthenticated``, ``log_level``,
``log_format``); options override the file. TLS and a token are required
unless ``allow_plain_http`` / ``allow_unauthenticated`` say otherwise.

Also runnable as ``python -m appliance.cli.witness`` (the integration tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from appliance import logs
from appliance.cli.options import fail
from appliance.errors import HotsiteError
from failover.witness import WitnessAgent, load_settings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Witness settings (TOML, top-level keys named like these options).",
)
@click.option("--listen", metavar="HOST:PORT", help="Where to serve GET /vote and /metrics.")
@click.option(
    "--primary",
    "primary",
    multiple=True,
    metavar="URL",
    help="A target showing the primary is alive (repeat): sip:HOST[:PORT][;transport=…], "
    "http(s)://…, tcp://HOST:PORT, icmp://HOST.",
)
@click.option("--name", help="This witness's name in its votes [default: the host name].")
@click.option("--interval", "interval_s", type=float, help="Seconds between probe rounds [default: 1].")
@click.option("--timeout", "timeout_s", type=float, help="Seconds each probe may take [default: 0.8].")
@click.option("--rise", type=int, help="Consecutive successes to judge a target up [default: 2].")
@click.option("--fall", type=int, help="Consecutive failures to judge a target down [default: 3].")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the bearer token voters must present.",
)
@click.option(
    "--tls-cert", "tls_cert_file", type=click.Path(dir_okay=False, path_type=Path), help="Serve HTTPS."
)
@click.option("--tls-key", "tls_key_file", type=click.Path(dir_okay=False, path_type=Path), help="Its key.")
@click.option(
    "--allow-plain-http",
    "allow_plain_http",
    is_flag=True,
    default=None,
    help="Serve plain HTTP without --tls-cert (votes can be read and forged on the way).",
)
@click.option(
    "--allow-unauthenticated",
    "allow_unauthenticated",
    is_flag=True,
    default=None,
    help="Answer without --token-file (anyone who reaches it may ask).",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["kv", "json"]))
def witness(config_file: Path | None, **options: object) -> None:
    """Probe the primary from here and tell the appliance what this place sees.

    Runs in the foreground; one log line per change of what it sees; SIGTERM
    or Ctrl-C stops it. A vote is "primary alive" while any target is up,
    "down" only when every target is judged down.

    \b
    Example:
      hotsite witness --listen 0.0.0.0:8443 --primary sip:10.1.0.10:5060 \\
          --primary http://10.1.0.10/health --token-file /etc/hotsite/witness.token \\
          --tls-cert /etc/hotsite/tls/witness.pem --tls-key /etc/hotsite/secrets/witness.key
      curl --cacert ca.pem -H "Authorization: Bearer $(cat token)" https://edge:8443/vote
    """
    overrides = {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
    try:
        settings = load_settings(config_file, overrides)
        logs.setup(settings.log_level, settings.log_format)
        agent = WitnessAgent(settings)
        asyncio.run(_run(agent))
    except HotsiteError as exc:
        fail(exc)


async def _run(agent: WitnessAgent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)


if __name__ == "__main__":
    witness()
