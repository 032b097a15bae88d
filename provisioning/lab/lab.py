"""The one-machine lab: real Kamailio, SIPp and HTTP peers the daemon can probe.

``Lab(workdir).up()`` builds the hosts of topology.py (network namespaces on a
bridge when it can, loopback addresses otherwise), starts their services,
waits until every one answers and writes ``workdir/lab.json`` — the info dict
that ``hotsite lab status --json`` prints, so people and tests find addresses,
ports, pids and logs without reading code.  ``down()`` removes everything,
even after a crash and without lab.json.  ``impair``/``heal`` cut or degrade a
host's network path.  Whatever the lab cannot do on this machine is listed,
with the reason, in the info's ``skipped``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from provisioning.lab import checks, kamailio, processes
from provisioning.lab import netns as ns
from provisioning.lab import replication as repl
from provisioning.lab import topology as topo

DEFAULT_WORKDIR = Path("/run/hotsite-lab")
SCENARIO = Path(__file__).with_name("scenarios") / "uas.xml"
# Answers OPTIONS, rejects INVITEs with the code given (`impair --reject-invites`).
REJECT_SCENARIO = Path(__file__).with_name("scenarios") / "uas-reject.xml"
# What a one-way SBC plays to the caller (`impair --one-way`): G.711 A-law speech, ~7 s, shipped
# with Debian's sip-tester.
PROMPT_PCAP = Path("/usr/share/sip-tester/g711a.pcap")
# RTP port SIPp echoes on (-mp; its default): the SDP of uas.xml's 200 OK names it.
MEDIA_PORT = 6000
# Reason phrases for the codes a carrier rejects calls with (others: "Rejected").
REASONS = {
    403: "Forbidden",
    404: "Not Found",
    480: "Temporarily Unavailable",
    486: "Busy Here",
    500: "Server Internal Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    603: "Decline",
}
HEALTHD = Path(__file__).with_name("healthd.py")
MODES = ("auto", "netns", "loopback")
SIPP_MAX_LOG_BYTES = 1_048_576

# Files up() generates in the workdir; down() removes exactly these.
GENERATED = (
    "lab.json",
    "lab.json.tmp",
    "kamailio.cfg",
    "dispatcher.list",
    "kamailio.pid",
    "kamailio-rpc.sock",
    "witness.toml",
    repl.SOURCE_CONFIG,
)
GENERATED_GLOBS = ("*.log", "*.unhealthy", "uas-reject-*.xml", "uas-oneway-*.xml")
GENERATED_DIRS = ("kamailio-run", repl.TLS_DIR, repl.DATA_DIR)


def sipp_command(
    sipp: str,
    addr: str,
    workdir: Path,
    host: str,
    *,
    reject: int | None = None,
    media: bool = True,
    one_way: bool = False,
) -> list[str]:
    """The SIPp peer of a lab host: answers OPTIONS, and INVITEs with media or a rejection.

    ``media``: SIPp echoes the RTP it receives on :data:`MEDIA_PORT` (``-rtp_echo``),
    so a test call hears its own audio back and can time the round trip.
    ``reject``: INVITEs get this final code instead (OPTIONS still 200); the
    scenario is written to ``workdir`` with the code filled in.
    ``one_way``: one-way audio. Once the call is answered SIPp plays :data:`PROMPT_PCAP`
    to the caller's RTP address, and echoes nothing: the caller hears the far end,
    the far end never hears the caller (its RTP arrives and is dropped).
    """
    scenario = SCENARIO
    if one_way:
        if not PROMPT_PCAP.exists():
            raise LabError(f"one-way audio needs {PROMPT_PCAP}: install the Debian package sip-tester")
        scenario = workdir / f"uas-oneway-{host}.xml"
        play = f'<nop><action><exec play_pcap_audio="{PROMPT_PCAP}"/></action></nop>'
        ack = '<recv request="ACK" crlf="true"/>'
        scenario.write_text(SCENARIO.read_text().replace(ack, f"{ack}\n\n  {play}", 1))
        media = False
    if reject:
        scenario = workdir / f"uas-reject-{host}.xml"
        text = REJECT_SCENARIO.read_text().replace("@CODE@", str(reject))
        scenario.write_text(text.replace("@REASON@", REASONS.get(reject, "Rejected")))
    cmd = [sipp, "-sf", str(scenario), "-i", addr, "-p", str(topo.SIP_PORT), "-bind_local", "-nostdin"]
    if media:
        cmd += ["-mp", str(MEDIA_PORT), "-rtp_echo"]
    return cmd + [
        "-trace_err",
        "-error_file",
        str(workdir / f"sipp-{host}-errors.log"),
        "-max_log_size",
        str(SIPP_MAX_LOG_BYTES),
    ]


class LabError(Exception):
    """Something expected went wrong; the message says what and what to do."""


class Lab:
    def __init__(self, workdir: Path = DEFAULT_WORKDIR) -> None:
        self.workdir = Path(os.path.abspath(workdir))
        self.info_path = self.workdir / "lab.json"

    # ------------------------------------------------------------------ up
    def up(self, mode: str = "auto", *, replication: bool = False) -> dict[str, Any]:
        """Build and start the lab; ``replication``: the primary also runs ``hotsite source``
        (serving a CRM database and a dialplan tree over mutual TLS) and a writer changing that
        database (provisioning/lab/replication.py). Off by default: the lab's other tests
        need neither the processes nor the replication incidents a cut of the primary raises.
        """
        if mode not in MODES:
            raise LabError(f"unknown lab mode {mode!r}: expected one of {', '.join(MODES)}")
        self._refuse_if_up()
        kam, sipp, module_dir = self._find_tools()
        skipped: list[str] = []
        mode = self._resolve_mode(mode, skipped)
        self._check_unix_path()
        if mode == "loopback":
            self._check_ports_free(replication)  # before touching anything: nothing to undo
        self.workdir.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] | None = None
        try:
            caps = self._build_network(mode, skipped)
            info = self._info(mode, skipped, caps)
            self._write_configs(mode, module_dir)
            if replication:
                self._prepare_replication(info)
            self._start_all(info, kam, sipp)
            if replication:
                self._start_replication(info)
            self._save(info)
            self.wait_ready()
        except BaseException as exc:  # incl. KeyboardInterrupt: never leave half a lab
            detail = str(exc) if isinstance(exc, LabError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                self.down()
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise LabError(f"lab up failed, everything it made was removed: {detail}") from exc
        result = self.status()
        assert result is not None
        return result

    def _refuse_if_up(self) -> None:
        info = self._load()
        alive = info is not None and any(
            p["alive"] for h in self._with_state(info)["hosts"] for p in h["processes"]
        )
        if alive:
            raise LabError(f"the lab in {self.workdir} is already up; run `hotsite lab down` first")
        existing = ns.lab_namespaces()
        if existing:
            raise LabError(
                f"lab namespaces already exist ({', '.join(existing)}): a lab is up, maybe from "
                "another workdir; run `hotsite lab down` (or Lab(workdir).down()) first"
            )
        if info is not None:
            self.down()  # stale leftovers of a crashed lab in this workdir

    def _find_tools(self) -> tuple[str, str, str]:
        kam = kamailio.find_binary()
        if kam is None:
            raise LabError(
                "kamailio not found: install the Debian packages kamailio and kamailio-extra-modules"
            )
        sipp = shutil.which("sipp")
        if sipp is None:
            raise LabError("sipp not found: install the Debian package sip-tester")
        module_dir = kamailio.find_module_dir()
        if module_dir is None:
            raise LabError("Kamailio modules not found (no dispatcher.so under /usr/lib*/kamailio)")
        missing = kamailio.missing_modules(module_dir)
        if missing:
            raise LabError(
                f"Kamailio modules missing in {module_dir}: {', '.join(missing)} "
                "(install kamailio-extra-modules)"
            )
        return kam, sipp, module_dir

    def _resolve_mode(self, mode: str, skipped: list[str]) -> str:
        why_not = None
        if not ns.running_as_root():
            why_not = "not running as root"
        elif shutil.which("ip") is None:
            why_not = "the ip command (iproute2) is missing"
        if mode == "netns" and why_not:
            raise LabError(f"cannot build the namespace lab: {why_not}")
        if mode == "auto":
            mode = "loopback" if why_not else "netns"
        if mode == "loopback":
            reason = why_not or "loopback mode was asked for"
            skipped.append(f"network namespaces: {reason}; hosts are 127.77.0.x on lo")
            skipped.append(
                "tc netem loss/delay: no namespaces; impair(cut=True) stops the "
                "host's processes (SIGSTOP) instead"
            )
        return mode

    def _check_unix_path(self) -> None:
        if len(str(self.workdir / "kamailio-rpc.sock")) > 100:
            raise LabError(f"workdir path too long for a unix socket: {self.workdir}")

    def _build_network(self, mode: str, skipped: list[str]) -> dict[str, Any]:
        if mode == "loopback":
            return {"namespaces": False, "netem": False, "cut": "sigstop"}
        net_prefix = topo.NETNS_APPLIANCE_ADDR.rsplit(".", 1)[0] + "."
        clash = [(i, a) for i, a in ns.root_addresses() if a.startswith(net_prefix)]
        if clash:
            raise LabError(
                f"address {clash[0][1]} on {clash[0][0]} is already in the lab "
                f"subnet {net_prefix}0/{topo.PREFIX_LEN}; remove it first"
            )
        if ns.root_link_exists(topo.APPLIANCE_IFACE):
            ns.delete_root_link(topo.APPLIANCE_IFACE)  # leftover of a crashed lab
        ns.build(topo.HOSTS, topo.NETNS_APPLIANCE_ADDR)
        netem, reason = ns.netem_supported()
        nft, nft_reason = (False, "") if netem else ns.nft_supported()
        if not netem:
            loss = "loss uses nftables instead" if nft else f"loss skipped too ({nft_reason})"
            skipped.append(
                f"{reason}: delay impairments skipped, {loss}; impair(cut=True) sets "
                "the host's bridge port down instead"
            )
        return {
            "namespaces": True,
            "netem": netem,
            "nft_loss": nft,
            "cut": "netem" if netem else "link-down",
        }

    def _check_ports_free(self, replication: bool = False) -> None:
        for h in topo.HOSTS:
            addr = h.loopback_addr
            ports = h.ports()
            if replication and h.name == "primary":
                ports["replication"] = repl.PORT
            for svc, port in ports.items():
                kinds = (
                    [socket.SOCK_STREAM]
                    if svc in ("rpc", "http", "replication")
                    else [socket.SOCK_DGRAM, socket.SOCK_STREAM]
                )
                for kind in kinds:
                    with socket.socket(socket.AF_INET, kind) as s:
                        if kind == socket.SOCK_STREAM:
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        try:
                            s.bind((addr, port))
                        except OSError as exc:
                            proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
                            raise LabError(
                                f"port {addr}:{port}/{proto} ({h.name} {svc}) is not free: {exc.strerror}"
                            ) from exc

    def _info(self, mode: str, skipped: list[str], caps: dict[str, Any]) -> dict[str, Any]:
        netns_mode = mode == "netns"
        carrier = topo.host("carrier")
        kaddr = carrier.address(mode)
        hosts: list[dict[str, Any]] = []
        for h in topo.HOSTS:
            hosts.append(
                {
                    "name": h.name,
                    "role": h.role,
                    "namespace": h.namespace if netns_mode else None,
                    "interface": topo.HOST_IFACE if netns_mode else "lo",
                    "address": h.address(mode),
                    "ports": h.ports(),
                    "impairment": None,
                    "processes": [],
                }
            )
        return {
            "mode": mode,
            "workdir": str(self.workdir),
            "skipped": list(skipped),
            "capabilities": caps,
            "appliance": {
                "namespace": None,
                "interface": topo.APPLIANCE_IFACE if netns_mode else "lo",
                "address": topo.NETNS_APPLIANCE_ADDR if netns_mode else topo.LOOPBACK_APPLIANCE_ADDR,
            },
            "kamailio": {
                "sip": f"{kaddr}:{topo.SIP_PORT}",
                "rpc_url": f"http://{kaddr}:{topo.RPC_PORT}{topo.RPC_PATH}",
                "rpc_socket": str(self.workdir / "kamailio-rpc.sock"),
                "dispatcher_list": str(self.workdir / "dispatcher.list"),
                "sets": {"primary": topo.SET_PRIMARY, "backup": topo.SET_BACKUP},
            },
            "hosts": hosts,
        }

    def _write_configs(self, mode: str, module_dir: str) -> None:
        (self.workdir / "kamailio-run").mkdir(exist_ok=True)
        (self.workdir / "dispatcher.list").write_text(
            kamailio.render_dispatcher_list(
                topo.host("primary").address(mode),
                topo.host("backup").address(mode),
                trunks=[h.address(mode) for h in topo.HOSTS if h.role == "trunk"],
            )
        )
        (self.workdir / "kamailio.cfg").write_text(
            kamailio.render_cfg(
                address=topo.host("carrier").address(mode),
                module_dir=module_dir,
                dispatcher_list=self.workdir / "dispatcher.list",
                rpc_socket=self.workdir / "kamailio-rpc.sock",
                trunks=[h.address(mode) for h in topo.HOSTS if h.role == "trunk"],
            )
        )

    def _start_all(self, info: dict[str, Any], kam: str, sipp: str) -> None:
        wd = self.workdir
        # Peers first, Kamailio last, so its first keepalives find them up.
        order = {"healthd": 0, "sipp": 1, "kamailio": 2, "witness": 3}
        jobs = sorted(((order[s], h, s) for h in topo.HOSTS for s in h.services), key=lambda j: j[0])
        by_name = {h["name"]: h for h in info["hosts"]}
        for _, h, svc in jobs:
            entry = by_name[h.name]
            addr = entry["address"]
            if svc == "healthd":
                cmd = [
                    sys.executable,
                    str(HEALTHD),
                    "--bind",
                    addr,
                    "--port",
                    str(topo.HTTP_PORT),
                    "--site",
                    h.name,
                    "--workdir",
                    str(wd),
                ]
            elif svc == "witness":
                # The real `hotsite witness`, watching the primary from its own namespace.
                primary = by_name["primary"]["address"]
                settings = wd / "witness.toml"
                settings.write_text(
                    'name = "lab-witness"\n'
                    f'listen = "{addr}:{topo.HTTP_PORT}"\n'
                    f'primary = ["sip:{primary}:{topo.SIP_PORT}", "http://{primary}:{topo.HTTP_PORT}/health"]\n'
                    "interval_s = 0.5\ntimeout_s = 0.4\nrise = 2\nfall = 3\n"
                    # The lab's namespaces are its own: plain and open, said explicitly.
                    "allow_plain_http = true\nallow_unauthenticated = true\n"
                )
                cmd = [sys.executable, "-m", "appliance.cli.witness", "--config", str(settings)]
            elif svc == "sipp":
                cmd = sipp_command(sipp, addr, wd, h.name)
            else:
                cmd = kamailio.command(kam, wd / "kamailio.cfg", wd / "kamailio.pid", wd / "kamailio-run")
            proc = processes.start(
                svc,
                h.name,
                cmd,
                wd / f"{svc}-{h.name}.log" if svc != "kamailio" else wd / "kamailio.log",
                entry["namespace"],
            )
            entry["processes"].append({"name": proc.name, "pid": proc.pid, "log": proc.log})

    def _prepare_replication(self, info: dict[str, Any]) -> None:
        entry, _ = self._host(info, "primary")
        info["replication"] = repl.prepare(self.workdir, entry["address"])
        entry["ports"]["replication"] = repl.PORT

    def _start_replication(self, info: dict[str, Any]) -> None:
        """The primary's source agent and CRM writer, recorded like its SIPp and healthd."""
        entry, _ = self._host(info, "primary")
        for name, cmd in repl.commands(info["replication"]):
            log = self.workdir / f"{name}-primary.log"
            proc = processes.start(name, "primary", cmd, log, entry["namespace"])
            entry["processes"].append({"name": proc.name, "pid": proc.pid, "log": proc.log})

    # ---------------------------------------------------------------- state
    def _load(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.info_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {self.info_path}: {exc}; run `hotsite lab down`") from exc

    def _save(self, info: dict[str, Any]) -> None:
        stored = json.loads(json.dumps(info))
        for h in stored["hosts"]:
            for p in h["processes"]:
                p.pop("alive", None)
        tmp = self.info_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stored, indent=2) + "\n")
        os.replace(tmp, self.info_path)

    def _with_state(self, info: dict[str, Any]) -> dict[str, Any]:
        for h in info["hosts"]:
            h["processes"] = [
                {
                    "name": p["name"],
                    "pid": p["pid"],
                    "alive": processes.alive(int(p["pid"]), self.workdir),
                    "log": p["log"],
                }
                for p in h["processes"]
            ]
        return info

    def status(self) -> dict[str, Any] | None:
        info = self._load()
        return None if info is None else self._with_state(info)

    def _require(self) -> dict[str, Any]:
        info = self._load()
        if info is None:
            raise LabError(f"the lab is not up (no {self.info_path}); run `hotsite lab up`")
        return info

    # -------------------------------------------------------------- readiness
    def wait_ready(self, timeout: float = 20.0) -> None:
        info = self._require()
        deadline = time.monotonic() + timeout
        while True:
            problems = self._not_ready(info)
            if not problems:
                return
            if time.monotonic() >= deadline or any(p.startswith("died:") for p in problems):
                raise LabError(f"lab not ready after {timeout:g}s: " + "; ".join(problems))
            time.sleep(0.2)

    def _not_ready(self, info: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        bind = info["appliance"]["address"]
        for h in info["hosts"]:
            for p in h["processes"]:
                if not processes.alive(int(p["pid"]), self.workdir):
                    tail = processes.log_tail(p["log"], 8)
                    problems.append(
                        f"died: {p['name']} on {h['name']} (pid {p['pid']}), log {p['log']}:\n{tail}"
                    )
            addr, ports = h["address"], h["ports"]
            names = {p["name"] for p in h["processes"]}
            if "sip" in ports:
                try:
                    line = checks.sip_options(addr, ports["sip"], timeout=0.5, bind=bind)
                    if " 200 " not in line + " ":
                        problems.append(f"{h['name']} SIP OPTIONS {addr}:{ports['sip']}: {line}")
                except OSError as exc:
                    problems.append(
                        f"{h['name']} SIP OPTIONS {addr}:{ports['sip']}: {exc.strerror or 'no answer'}"
                    )
            if "http" in ports and "witness" in names:
                try:
                    code, body = checks.http_get(addr, ports["http"], "/vote", timeout=0.5)
                    if code != 200 or b'"primary_alive": true' not in body.replace(b'":true', b'": true'):
                        problems.append(f"{h['name']} witness: HTTP {code}, not yet seeing the primary")
                except OSError as exc:
                    problems.append(f"{h['name']} witness {addr}:{ports['http']}: {exc}")
            if "http" in ports and "healthd" in names:
                try:
                    code, _ = checks.http_get(addr, ports["http"], "/health", timeout=0.5)
                    if code != 200:
                        problems.append(f"{h['name']} healthd: HTTP {code}")
                except OSError as exc:
                    problems.append(f"{h['name']} healthd {addr}:{ports['http']}: {exc}")
            if "replication" in ports:
                problems.extend(self._source_not_ready(info, addr, ports["replication"]))
            if "rpc" in ports:
                try:
                    res = checks.jsonrpc(addr, ports["rpc"], topo.RPC_PATH, "dispatcher.list")
                    flags = checks.dispatcher_flags(res)
                    for set_id in info["kamailio"]["sets"].values():
                        dests = flags.get(set_id, {})
                        # "AP": active and probed, i.e. Kamailio's keepalives get answers.
                        if not dests or not all(f == "AP" for f in dests.values()):
                            problems.append(
                                f"Kamailio dispatcher set {set_id} not active: {dests or 'missing'}"
                            )
                except (OSError, RuntimeError, ValueError) as exc:
                    problems.append(f"Kamailio RPC {addr}:{ports['rpc']}: {exc}")
        return problems

    @staticmethod
    def _source_not_ready(info: dict[str, Any], addr: str, port: int) -> list[str]:
        """The source agent completes a mutual-TLS handshake with the appliance's certificate."""
        r = info.get("replication") or {}
        try:
            checks.tls_handshake(
                addr,
                port,
                ca=r["tls_ca_file"],
                cert=r["tls_cert_file"],
                key=r["tls_key_file"],
                server_name=r["server_name"],
                timeout=0.5,
            )
        except (OSError, KeyError) as exc:
            return [f"primary source agent {addr}:{port}: {exc}"]
        return []

    # ---------------------------------------------------------- impairments
    def impair(
        self,
        host: str,
        *,
        loss_pct: float | None = None,
        delay_ms: float | None = None,
        cut: bool = False,
        reject_invites: int | None = None,
        no_media: bool = False,
        one_way: bool = False,
    ) -> str:
        if reject_invites is not None or no_media or one_way:
            desc = self.impair_calls(host, reject=reject_invites, media=not no_media, one_way=one_way)
            if not cut and not loss_pct and not delay_ms:
                return desc
        info = self._require()
        entry, h = self._host(info, host)
        if loss_pct is not None and not 0 <= loss_pct <= 100:
            raise LabError(f"loss_pct must be between 0 and 100, got {loss_pct}")
        if delay_ms is not None and delay_ms < 0:
            raise LabError(f"delay_ms must be >= 0, got {delay_ms}")
        if not cut and not loss_pct and not delay_ms:
            raise LabError("nothing to do: give cut, loss_pct or delay_ms")
        caps = info.get("capabilities", {})
        if cut:
            if info["mode"] == "netns":
                self._netlink(
                    lambda: ns.impair(h, loss_pct=0, delay_ms=0, cut=True, netem=caps.get("netem", False))
                )
                how = "100% loss both ways (netem)" if caps.get("netem") else "bridge port down"
            else:
                for p in entry["processes"]:
                    processes.signal_group(int(p["pid"]), signal.SIGSTOP)
                how = "processes stopped (SIGSTOP)"
            desc = f"{host} cut off: {how}"
        else:
            wanted = ", ".join(
                x
                for x in (
                    f"loss {loss_pct:g}%" if loss_pct else "",
                    f"delay {delay_ms:g} ms" if delay_ms else "",
                )
                if x
            )
            if not caps.get("netem"):
                if caps.get("nft_loss") and loss_pct and not delay_ms:
                    ns.nft_loss(h.namespace, loss_pct)
                    desc = f"{host}: loss {loss_pct:g}% on egress (nftables)"
                    entry["impairment"] = desc
                    self._save(info)
                    return desc
                reason = next((s for s in info["skipped"] if "netem" in s), "no tc netem")
                return f"skipped: {wanted} on {host} ({reason})"
            self._netlink(
                lambda: ns.impair(h, loss_pct=loss_pct or 0, delay_ms=delay_ms or 0, cut=False, netem=True)
            )
            desc = f"{host}: {wanted} on {topo.HOST_IFACE} egress (netem)"
        entry["impairment"] = desc
        self._save(info)
        return desc

    def impair_calls(
        self, host: str, *, reject: int | None = None, media: bool = True, one_way: bool = False
    ) -> str:
        """Calls fail while keepalives still pass: the grey failure only a test call reveals.

        The host's SIPp is restarted with INVITEs rejected (``reject``, a 4xx-6xx
        code) or answered without echoing RTP (``media=False``); OPTIONS keep
        getting 200 (one keepalive may fall in the restart's few milliseconds).
        ``one_way``: answered, the SBC plays a prompt to the caller and never echoes
        the caller's RTP (see :func:`sipp_command`).
        """
        if one_way and (reject is not None or not media):
            raise LabError("one_way: give it alone (not with reject_invites or no_media)")
        if reject is not None and not 400 <= reject <= 699:
            raise LabError(f"reject_invites must be a final failure code 400-699, got {reject}")
        info = self._require()
        entry, _ = self._host(info, host)
        self._restart_sipp(info, entry, reject=reject, media=media, one_way=one_way)
        what = [f"INVITEs rejected with {reject} {REASONS.get(reject, 'Rejected')}" if reject else ""]
        what.append("" if media else "calls answered without media")
        what.append(
            "one-way audio: calls answered, a prompt played, the caller's RTP never echoed" if one_way else ""
        )
        desc = f"{host}: " + ", ".join(w for w in what if w) + "; OPTIONS still answered"
        entry["impairment"] = desc
        entry["calls"] = {"reject": reject, "media": media, "one_way": one_way}
        self._save(info)
        return desc

    def _restart_sipp(
        self,
        info: dict[str, Any],
        entry: dict[str, Any],
        *,
        reject: int | None,
        media: bool,
        one_way: bool = False,
    ) -> None:
        procs = [p for p in entry["processes"] if p["name"] == "sipp"]
        if not procs:
            raise LabError(f"{entry['name']} runs no SIPp peer: nothing answers its calls")
        sipp = shutil.which("sipp")
        if sipp is None:
            raise LabError("sipp not found: install the Debian package sip-tester")
        processes.terminate([int(p["pid"]) for p in procs])
        name = entry["name"]
        cmd = sipp_command(
            sipp, entry["address"], self.workdir, name, reject=reject, media=media, one_way=one_way
        )
        proc = processes.start("sipp", name, cmd, self.workdir / f"sipp-{name}.log", entry["namespace"])
        entry["processes"] = [p for p in entry["processes"] if p["name"] != "sipp"]
        entry["processes"].append({"name": proc.name, "pid": proc.pid, "log": proc.log})
        self._save(info)
        deadline, bind = time.monotonic() + 5, info["appliance"]["address"]
        while True:
            try:
                line = checks.sip_options(entry["address"], topo.SIP_PORT, timeout=0.3, bind=bind)
                if " 200 " in line + " ":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or not processes.alive(proc.pid, self.workdir):
                raise LabError(f"SIPp on {name} did not come back: {processes.log_tail(proc.log, 8)}")
            time.sleep(0.05)

    def degrade(self, host: str, reason: str = "ACD down: no agents can take calls") -> str:
        """A grey failure: the host's health endpoint says it cannot serve; its SIP keeps answering."""
        info = self._require()
        entry, _ = self._host(info, host)
        if "http" not in entry["ports"]:
            raise LabError(f"{host} has no health endpoint to degrade")
        (self.workdir / f"{host}.unhealthy").write_text(reason + "\n")
        entry["impairment"] = desc = f"{host} degraded (health says: {reason}); SIP still answers"
        self._save(info)
        return desc

    def partition(self, host: str, peer: str) -> str:
        """Cut only the path between ``host`` and ``peer`` (e.g. the appliance); others still reach it."""
        info = self._require()
        _, h = self._host(info, host)
        if info["mode"] != "netns" or not info.get("capabilities", {}).get("nft_loss"):
            raise LabError("a partition needs the namespace lab and nftables")
        peer_addr = (
            info["appliance"]["address"] if peer == "appliance" else self._host(info, peer)[0]["address"]
        )
        ns.nft_partition(h.namespace, peer_addr)
        entry = self._host(info, host)[0]
        entry["impairment"] = desc = f"{host} cut off from {peer} ({peer_addr}) only"
        self._save(info)
        return desc

    def heal(self, host: str) -> str:
        info = self._require()
        entry, h = self._host(info, host)
        (self.workdir / f"{host}.unhealthy").unlink(missing_ok=True)
        calls_impaired = entry.pop("calls", None) is not None
        if info["mode"] == "netns":
            self._netlink(lambda: ns.heal(h, netem=info.get("capabilities", {}).get("netem", False)))
            if info.get("capabilities", {}).get("nft_loss"):
                ns.nft_clear(h.namespace)
        else:
            for p in entry["processes"]:
                processes.signal_group(int(p["pid"]), signal.SIGCONT)
        if calls_impaired:  # after the network: the restarted SIPp must answer OPTIONS
            self._restart_sipp(info, entry, reject=None, media=True)
        was = entry.get("impairment")
        entry["impairment"] = None
        self._save(info)
        return f"{host} healed" + (f" (was: {was})" if was else " (was not impaired)")

    def _host(self, info: dict[str, Any], name: str) -> tuple[dict[str, Any], topo.Host]:
        for entry in info["hosts"]:
            if entry["name"] == name:
                return entry, topo.host(name)
        known = ", ".join(h["name"] for h in info["hosts"])
        raise LabError(f"unknown lab host {name!r} (known: {known})")

    @staticmethod
    def _netlink(action: Any) -> None:
        try:
            action()
        except (OSError, LookupError) as exc:
            raise LabError(
                f"network change failed: {exc}; is the lab still up? (`hotsite lab status`)"
            ) from exc

    # ----------------------------------------------------------------- down
    def down(self) -> list[str]:
        """Remove the lab; lines say what was removed ([] when there was nothing)."""
        # Gather every process first, stop them all at once, then the network.
        named: dict[int, str] = {}
        try:
            info = self._load()
        except LabError:
            info = None
        for h in (info or {}).get("hosts", []):
            for p in h.get("processes", []):
                if processes.alive(int(p["pid"]), self.workdir):
                    named[int(p["pid"])] = f"{p['name']} on {h['name']}"
        root = ns.running_as_root()
        namespaces = ns.lab_namespaces() if root else []
        for name in namespaces:
            for pid in ns.namespace_pids(name):
                named.setdefault(pid, f"a process in namespace {name}")
        for pid in processes.find_by_workdir(self.workdir):
            named.setdefault(pid, f"a process referencing {self.workdir}")
        lines = [f"stopped {named[pid]} (pid {pid})" for pid in processes.terminate(list(named))]
        if root:
            try:
                lines.extend(ns.teardown())
            except OSError as exc:
                lines.append(f"could not remove every lab namespace/link: {exc}")
        lines.extend(self._remove_files())
        return lines

    def _remove_files(self) -> list[str]:
        removed = 0
        paths = [self.workdir / n for n in GENERATED]
        for pattern in GENERATED_GLOBS:
            paths.extend(self.workdir.glob(pattern))
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
        for d in GENERATED_DIRS:
            if (self.workdir / d).is_dir():
                shutil.rmtree(self.workdir / d, ignore_errors=True)
                removed += 1
        with contextlib.suppress(OSError):
            self.workdir.rmdir()  # only when empty: never remove what we did not make
        return [f"removed {removed} generated files from {self.workdir}"] if removed else []


__all__ = ["DEFAULT_WORKDIR", "Lab", "LabError"]
