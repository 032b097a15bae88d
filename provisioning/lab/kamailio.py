"""Render the lab's Kamailio config and dispatcher list.

The carrier-edge Kamailio is the proxy hotsite switches over: the dispatcher
set used for new calls comes from the htable ``routing`` (key ``active_set``,
1 = primary SBC, 2 = backup SBC), optionally overridden per dialled number in
htable ``hotlines``.  Kamailio's own first line of defence stays in: priority
selection (algorithm 8) with ``ds_next_dst()`` on failure, a short tm
``fr_timer`` (see :class:`Timers`), OPTIONS keepalives every second.

**Ringing branches on a dead or fenced SBC.** tm arms ``fr_inv_timer`` (60 s)
on a branch at its first provisional reply (t_reply.c ``reply_received``) and
stops retransmitting the INVITE, so a call that got 100/180 from an SBC that
then dies waits a minute and is never retried by ``failure_route``. Kamailio
5.6 offers no call to end such a branch early: tmx ``t_cancel_callid`` and the
``tm.cancel`` RPC send a CANCEL but leave the branch on its fr_inv timer
("just wait for timeout", t_cancel.c), and nothing answers from a dead SBC;
``t_set_fr()`` moves ``fr_expire`` of running branches (timer.h ``change_fr``)
but a branch with retransmissions stopped sleeps until the old expiry (timer.c
``retr_buf_handler``), so it does not wake earlier. What does end a branch is
a final reply on it. So every INVITE branch sent to an SBC is remembered as it
leaves (``onsend_route``: htable ``ringing``, Call-ID -> set, SBC URI, CSeq;
htable ``ringmsg``: a 503 carrying the branch's own Via, whose branch
parameter is what tm matches replies by), and an rtimer route (every
``ringing_check_ms``) ends the pending branch of every call whose SBC is
fenced (htable ``fenced``, written by hotsite's Kamailio actuator) or has been
inactive in the dispatcher (OPTIONS keepalives failing) for
``ringing_dead_limit_ms`` while another SBC of its set is up: (1)
``t_cancel_callid()`` sends the SBC a CANCEL, so one that is fenced but alive
stops ringing and the call is never answered at both sites, and does *not*
mark the transaction canceled (only an end-to-end CANCEL sets T_CANCELED), so
new branches may still be added; (2) corex ``send_data`` sends Kamailio, from
its own socket, that 503. tm takes it as the branch's final answer and
``failure_route`` retries the call at the next destination (the backup), as
for any 5xx; a late 487 from the SBC is absorbed (the branch is final
already). Calls at healthy SBCs are untouched. The bookkeeping is done as the
INVITE leaves, not on its replies: Kamailio sends a relayed provisional after
releasing the reply lock (t_reply.c ``relay_reply``), so under CPU load a 180
that came back-to-back with its 200 can leave after it (seen, rarely, with and
without this code; SIPp's uac counts such a call as failed, a phone ignores
the stray 180), and work added to provisional replies widens that window.
Facts: /work/shared/REFERENCE.md, Kamailio 5.6 tm/tmx/dispatcher sources.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitoring import kpis
from provisioning.lab import topology as topo

MODULE_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/kamailio/modules",
    "/usr/lib/*/kamailio/modules",
    "/usr/lib/kamailio/modules",
    "/usr/lib64/kamailio/modules",
    "/usr/local/lib*/kamailio/modules",
)
REQUIRED_MODULES = (
    "dispatcher",
    "jsonrpcs",
    "xhttp",
    "htable",
    "tm",
    "tmx",
    "sl",
    "rr",
    "dialog",
    "rtimer",
    "corex",
    "statistics",
)

# htable the Kamailio actuator writes: fenced=><dispatcher URI> (any value) for every fenced SBC.
FENCED_TABLE = "fenced"
# The final reply Kamailio sends itself to end a ringing branch at a fenced or dead SBC.
ABANDON_STATUS = 503
ABANDON_FLAG = 10  # message flag t_cancel_callid sets on a given-up call (seen in failure_route)
SET_TRUNKS = 3  # the carrier trunks (render_dispatcher_list(trunks=...)): keepalives only, no routing
TICKS_MS = 1000 // 16  # tm's timer resolution: 16 ticks a second (TIMER_TICKS_HZ)
# Per-trunk call KPIs (monitoring/KPIS.md): transaction flags that make each count once per call.
KPI_RANG_FLAG = 11  # post-dial delay taken (first 18x or 2xx relayed)
KPI_ANSWERED_FLAG = 12  # answered counted (a retransmitted 200 OK must not count again)


@dataclass(frozen=True)
class Timers:
    """tm and rescue timers of the generated config, in milliseconds.

    * ``fr_timer_ms`` 400: how long a branch may stay without *any* reply
      before ``failure_route`` tries the next SBC.  It is the post-dial delay
      added to calls sent to an SBC that just died (target <= 500 ms, and the
      backup must still answer inside it), and the timeout of the dispatcher's
      OPTIONS keepalives (Kamailio 5.6 has no separate ping timer).  400 ms is
      some 10x a continental RTT; a live SBC answers 100 Trying within one RTT.
    * ``t1_timer_ms`` 200: first UDP retransmission (RFC 3261 T1, default
      500).  With fr 400 an INVITE or keepalive is sent twice before the branch
      is given up, so one lost packet never moves a call or marks an SBC down
      (two in a row at 5% loss: 0.25%).
    * ``fr_inv_timer_ms`` 60000: how long a branch that rings may wait for an
      answer (queues at a call centre ring long; unchanged).
    * ``ringing_check_ms`` 100: how often the rescue route looks at ringing
      branches; a fence is acted on within it.
    * ``ringing_dead_limit_ms`` 2000: a pending branch whose SBC the dispatcher
      marks inactive (keepalives failing, no hotsite decision) is given up once
      the SBC has been inactive this long: two missed keepalive rounds, so a
      single lost OPTIONS (the SBC is inactive for one second, until the next
      one) never moves a ringing call.
    """

    fr_timer_ms: int = 400
    t1_timer_ms: int = 200
    fr_inv_timer_ms: int = 60000
    ringing_check_ms: int = 100
    ringing_dead_limit_ms: int = 2000


def timer_problems(t: Timers) -> list[str]:
    """Why a set of timers would not work as documented in :class:`Timers` ([] when fine)."""
    found = []
    for name in ("fr_timer_ms", "t1_timer_ms", "fr_inv_timer_ms", "ringing_check_ms"):
        if getattr(t, name) < TICKS_MS:
            found.append(f"{name} is {getattr(t, name)} ms, below tm's timer resolution of {TICKS_MS} ms")
    if t.fr_timer_ms < 2 * t.t1_timer_ms:
        found.append(
            f"fr_timer_ms {t.fr_timer_ms} < 2 x t1_timer_ms {t.t1_timer_ms}: a request would be given up"
            " before it is retransmitted once"
        )
    if t.fr_inv_timer_ms <= t.fr_timer_ms:
        found.append(f"fr_inv_timer_ms {t.fr_inv_timer_ms} must exceed fr_timer_ms {t.fr_timer_ms}")
    if t.ringing_dead_limit_ms < 1000 + t.fr_timer_ms:
        found.append(
            f"ringing_dead_limit_ms {t.ringing_dead_limit_ms} < one keepalive round (1000 ms + fr_timer_ms):"
            " one lost keepalive would move ringing calls"
        )
    return found


def find_binary() -> str | None:
    return shutil.which("kamailio") or next(
        (p for p in ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio") if os.access(p, os.X_OK)),
        None,
    )


def find_module_dir() -> str | None:
    """The directory holding dispatcher.so (Debian puts it under the multiarch dir)."""
    for pattern in MODULE_GLOBS:
        for d in sorted(glob.glob(pattern)):
            if os.path.exists(os.path.join(d, "dispatcher.so")):
                return d
    return None


def missing_modules(module_dir: str) -> list[str]:
    return [m for m in REQUIRED_MODULES if not os.path.exists(os.path.join(module_dir, f"{m}.so"))]


def render_dispatcher_list(primary_addr: str, backup_addr: str, trunks: Sequence[str] = ()) -> str:
    """Set 1 = the primary SBC first, the backup SBC second; set 2 = the backup SBC alone.

    ``trunks``: the carrier trunks, as set :data:`SET_TRUNKS`, kept alive by the
    same OPTIONS keepalives (what a carrier edge does for its outbound trunks):
    the lab shows the dispatcher still marking a trunk active while its calls fail.

    Set 1 keeps Kamailio's own first line of defence: a call the primary does
    not answer is retried at the backup (algorithm 8, ds_next_dst), losing no
    call on a hard failure. hotsite's failover moves hotlines to set 2 and
    fences set 1. Flags 0 = active (probed by mode 1); higher priority first.
    """
    return (
        "# hotsite lab dispatcher list: setid uri flags priority attrs\n"
        f"{topo.SET_PRIMARY} sip:{primary_addr}:{topo.SIP_PORT} 0 10 name=primary\n"
        f"{topo.SET_PRIMARY} sip:{backup_addr}:{topo.SIP_PORT} 0 0 name=backup-fallback\n"
        f"{topo.SET_BACKUP} sip:{backup_addr}:{topo.SIP_PORT} 0 0 name=backup\n"
    ) + "".join(f"{SET_TRUNKS} sip:{addr}:{topo.SIP_PORT} 0 0 name=trunk\n" for addr in trunks)


def trunk_ips(trunks: Any, key: str = "trunks") -> list[str]:
    """The IP addresses of the carrier trunks to count, from what an inventory may hold.

    Accepted: a list of ``"192.0.2.21"``, ``"192.0.2.21:5060"``, ``"[2001:db8::1]:5060"`` or
    mappings with an ``address`` of that form, or a mapping name -> such a mapping (the
    appliance's ``[trunks]`` table, so the edge can reuse it as it is). Statistics are per
    IP address (the INVITE's source, any port): two entries with one address are one trunk.
    Anything else is a :class:`ValueError` naming ``key`` and what is expected.
    """
    if trunks is None:
        return []
    if isinstance(trunks, Mapping):
        items: list[tuple[str, Any]] = [(f"{key}.{name}", t) for name, t in trunks.items()]
    elif isinstance(trunks, list | tuple):
        items = [(f"{key}[{i}]", t) for i, t in enumerate(trunks)]
    else:
        raise ValueError(
            f"{key}: expected a list of trunk addresses or a mapping of trunks, got {trunks!r:.80}"
        )
    ips: list[str] = []
    for where, item in items:
        address = item.get("address") if isinstance(item, Mapping) else item
        ip = _ip_of(address)
        if ip is None:
            raise ValueError(
                f"{where}: expected an IP address, IP:port or {{address: IP:port}}, got {item!r:.80}"
            )
        if ip not in ips:
            ips.append(ip)
    return ips


def _ip_of(address: Any) -> str | None:
    """``192.0.2.21`` from ``192.0.2.21`` or ``192.0.2.21:5060`` (``[v6]:port`` too); None if not one."""
    if not isinstance(address, str):
        return None
    host, port = address.strip(), ""
    if host.startswith("[") and "]:" in host:
        host, port = host[1:].split("]:", 1)
    elif host.count(":") == 1:
        host, port = host.split(":", 1)
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def render_cfg(
    *,
    address: str,
    module_dir: str,
    dispatcher_list: Path,
    rpc_socket: Path,
    timers: Timers | None = None,
    trunks: Sequence[str] = (),
) -> str:
    """The carrier edge's kamailio.cfg; ``timers`` defaults to :class:`Timers` ().

    ``trunks``: the carrier trunks' IP addresses. Calls arriving from one of them
    are counted in Kamailio statistics named by :func:`monitoring.kpis.stat_names`
    (attempts, answered, final failures by class and code, post-dial delay), read
    by hotsite with ``stats.get_statistics``; calls from anywhere else are not
    counted (the statistics module only updates declared names: bounded memory).
    """
    t = timers or Timers()
    bad = timer_problems(t)
    if bad:
        raise ValueError("Kamailio timers: " + "; ".join(bad))
    sip, rpc = topo.SIP_PORT, topo.RPC_PORT
    dead_ticks = -(-t.ringing_dead_limit_ms // t.ringing_check_ms)  # ceil
    keep_s = t.fr_inv_timer_ms // 1000 + 10
    kpi_stats, kpi_seed = _kpi_declarations(trunks)
    kpi_codes = "|".join(map(str, kpis.CODES))
    return f"""#!KAMAILIO
# Generated by hotsite's lab (provisioning/lab/kamailio.py); rewritten on every `lab up`.

debug=2
log_stderror=yes
log_prefix="{{$mt $hdr(CSeq) $ci}} "
memdbg=5
memlog=5
children=2
tcp_children=2
auto_aliases=no
dns=no
rev_dns=no
dns_try_ipv6=no
use_dns_cache=off
tcp_accept_no_cl=yes
listen=udp:{address}:{sip}
listen=tcp:{address}:{sip}
listen=tcp:{address}:{rpc}
alias="{address}"

mpath="{module_dir}/"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "htable.so"
loadmodule "dispatcher.so"
loadmodule "xhttp.so"
loadmodule "jsonrpcs.so"
loadmodule "dialog.so"
loadmodule "rtimer.so"
loadmodule "statistics.so"

# A dead SBC costs a call at most fr_timer of post-dial delay (then the next
# SBC), and is noticed by the keepalives within a second plus fr_timer
# (Kamailio 5.6 has no ds_ping_fr_timer: keepalives use fr_timer too).
# retr_timer1 (T1) = fr_timer / 2: every request is retransmitted once first.
modparam("tm", "fr_timer", {t.fr_timer_ms})
modparam("tm", "retr_timer1", {t.t1_timer_ms})
modparam("tm", "fr_inv_timer", {t.fr_inv_timer_ms})

modparam("rr", "enable_full_lr", 1)

# routing=>active_set: the dispatcher set for new calls (1 primary, 2 backup).
# hotlines=><dialled number>: per-hotline override of that set.
modparam("htable", "htable", "routing=>size=4;autoexpire=0;")
modparam("htable", "htable", "hotlines=>size=8;autoexpire=0;")
# calls=><Call-ID>: the site that answered, for in-dialog requests that come
# back without Route headers (SIPp's built-in uac sends its BYE that way).
modparam("htable", "htable", "calls=>size=10;autoexpire=7200;")
# Ringing branches (see the module docstring of hotsite's generator):
# ringing=><Call-ID> = "<set>|<SBC URI>|<CSeq>" of its pending INVITE branch,
# ringmsg=><Call-ID> = the 503 that ends that branch, to send ourselves,
# ringdone=><Call-ID>: already given up; dsdown=><URI> = tick first seen inactive,
# dsseen=><URI> = tick last looked at; {FENCED_TABLE}=><URI>: fenced by hotsite.
modparam("htable", "htable", "ringing=>size=10;autoexpire={keep_s};")
modparam("htable", "htable", "ringmsg=>size=10;autoexpire={keep_s};")
modparam("htable", "htable", "ringdone=>size=8;autoexpire=10;")
modparam("htable", "htable", "dsdown=>size=4;autoexpire=600;")
modparam("htable", "htable", "dsseen=>size=4;autoexpire=600;")
modparam("htable", "htable", "{FENCED_TABLE}=>size=4;autoexpire=0;")
modparam("pv", "shvset", "ringtick=i:0")
modparam("rtimer", "timer", "name=ringing;interval={t.ringing_check_ms * 1000}u;mode=1;")
modparam("rtimer", "exec", "timer=ringing;route=RINGING_CHECK")

# Calls in progress ("line resources"), counted per dispatcher set and per
# carrier trunk (the source address), read by hotsite with dlg.profile_get_size.
modparam("dialog", "profiles_with_value", "calls_by_set;calls_by_trunk")
modparam("dialog", "dlg_match_mode", 1)
modparam("dialog", "default_timeout", 7200)

# Per-trunk call KPIs: kpitrunk=><source IP> = the trunk's statistics prefix.
modparam("htable", "htable", "kpitrunk=>size=4;autoexpire=0;")
{kpi_stats}
modparam("dispatcher", "list_file", "{dispatcher_list}")
modparam("dispatcher", "flags", 2)
modparam("dispatcher", "ds_ping_interval", 1)
modparam("dispatcher", "ds_probing_mode", 1)
modparam("dispatcher", "ds_probing_threshold", 1)
modparam("dispatcher", "ds_inactive_threshold", 1)
modparam("dispatcher", "ds_ping_from", "sip:dispatcher@{address}")
# ds_ping_reply_codes deliberately unset: 408 is generated locally on timeout.

# JSON-RPC over HTTP (transport 1, via xhttp) and a datagram unix socket (4).
modparam("jsonrpcs", "transport", 5)
modparam("jsonrpcs", "dgram_socket", "{rpc_socket}")
modparam("jsonrpcs", "dgram_mode", 0660)
modparam("xhttp", "url_match", "^{topo.RPC_PATH}")

event_route[htable:mod-init] {{
    $sht(routing=>active_set) = {topo.SET_PRIMARY};
{kpi_seed}}}

event_route[xhttp:request] {{
    if ($Rp != {rpc}) {{
        xhttp_reply("403", "Forbidden", "text/plain", "RPC only on port {rpc}");
        exit;
    }}
    if ($hu =~ "^{topo.RPC_PATH}") {{
        # A fenced write (hotsite's Kamailio actuator) carries its token: refused when older than
        # routing=>token. Check and write under that key's (re-entrant) htable lock, so a fence
        # (htable.seti routing token) cannot slip between them and a write a pause held in
        # flight after the actuator's own check is still refused here.
        if ($hdr(X-Hotsite-Token) != $null) {{
            sht_lock("routing=>token");
            if ($sht(routing=>token) != $null && $(hdr(X-Hotsite-Token){{s.int}}) < $sht(routing=>token)) {{
                sht_unlock("routing=>token");
                xhttp_reply("409", "Conflict", "text/plain", "is older than routing=>token");
                exit;
            }}
            jsonrpc_dispatch();
            sht_unlock("routing=>token");
            exit;
        }}
        jsonrpc_dispatch();
        exit;
    }}
    xhttp_reply("404", "Not Found", "text/plain", "try {topo.RPC_PATH}");
}}

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}

    # Keepalives and health probes addressed to the proxy itself.
    if (is_method("OPTIONS") && uri==myself && $rU==$null) {{
        sl_send_reply("200", "OK");
        exit;
    }}

    # Retransmissions first (in-dialog ones too): a BYE retransmitted while
    # its first copy is still pending must not be routed again.
    if (!is_method("ACK|CANCEL") && t_check_trans()) {{
        exit;
    }}

    if (has_totag()) {{
        dlg_manage();  # in-dialog: lets the dialog module see the BYE that ends a call
        if (loose_route()) {{
            t_relay();
            exit;
        }}
        if ($sht(calls=>$ci) != $null) {{
            $du = $sht(calls=>$ci);
            if (is_method("BYE")) {{
                $sht(calls=>$ci) = $null;
            }}
            t_relay();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
            exit;
        }}
        sl_send_reply("404", "Not here");
        exit;
    }}

    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}

    # INVITE (a call) or OPTIONS to a number (an end-to-end probe of the
    # active site): route to a site.
    if (is_method("INVITE|OPTIONS")) {{
        if (is_method("INVITE")) {{
            dlg_manage();
            set_dlg_profile("calls_by_trunk", "$si");
            record_route();
            route(KPI_ATTEMPT);
        }}
        route(SITE);
        exit;
    }}

    sl_send_reply("405", "Method Not Allowed");
}}

route[SITE] {{
    $var(set) = {topo.SET_PRIMARY};
    if ($sht(routing=>active_set) != $null) {{
        $var(set) = $(sht(routing=>active_set){{s.int}});
    }}
    if ($rU != $null && $sht(hotlines=>$rU) != $null) {{
        $var(set) = $(sht(hotlines=>$rU){{s.int}});
    }}
    # Algorithm 8: by priority; the rest of the set stays as failover targets.
    if (!ds_select_dst("$var(set)", "8")) {{
        xlog("L_WARN", "no destination up in dispatcher set $var(set) for $rU\\n");
        $var(code) = 503;
        route(KPI_FAIL);
        sl_send_reply("503", "No Site Available");
        exit;
    }}
    if (is_method("INVITE")) {{
        set_dlg_profile("calls_by_set", "$var(set)");
    }}
    $avp(ds_set) = $var(set);
    t_on_failure("SITE_FAILOVER");
    t_on_reply("SITE_REPLY");
    if (!t_relay()) {{
        $var(code) = 500;
        route(KPI_FAIL);
        sl_reply_error();
    }}
    exit;
}}

# Every reply, before tm sees it: the reply that ends a ringing branch is only
# honoured from this proxy itself. One from anywhere else (someone who learnt a
# branch value) would end a branch whose SBC still rings: dropped, and logged.
reply_route {{
    if ($hdr(X-Hotsite-Abandon) != $null && ($si != "{address}" || $sp != {sip})) {{
        xlog("L_WARN", "X-Hotsite-Abandon for $ci from $si:$sp, not from this proxy: dropped\\n");
        drop;
    }}
}}

onreply_route[SITE_REPLY] {{
    if (!is_method("INVITE")) {{
        return;
    }}
    if ($avp(kpi) != $null && status =~ "^(18[0-9]|2[0-9][0-9])$" && !isflagset({KPI_RANG_FLAG})) {{
        route(KPI_PDD);
    }}
    if (status =~ "^1[0-9][0-9]$") {{
        return;  # provisional replies: nothing else to do (kept light, see onsend_route)
    }}
    $sht(ringing=>$ci) = $null;
    $sht(ringmsg=>$ci) = $null;
    if (status =~ "^2[0-9][0-9]$") {{
        $sht(calls=>$ci) = $_s(sip:$si:$sp);
        if ($avp(kpi) != $null && !isflagset({KPI_ANSWERED_FLAG})) {{
            setflag({KPI_ANSWERED_FLAG});
            $var(stat) = $avp(kpi) + "_answered";
            update_stat("$var(stat)", "+1");
        }}
    }}
}}

# Per-trunk call KPIs (monitoring/KPIS.md), counted in Kamailio's statistics,
# one call at a time, never read per call: hotsite reads the totals.
# An initial INVITE from a trunk: an attempt; its arrival time for the PDD.
route[KPI_ATTEMPT] {{
    if ($sht(kpitrunk=>$si) == $null) {{
        return;
    }}
    $avp(kpi) = $sht(kpitrunk=>$si);
    $avp(kpi_s) = $TV(sn);
    $avp(kpi_u) = $TV(un);
    $var(stat) = $avp(kpi) + "_attempts";
    update_stat("$var(stat)", "+1");
}}

# The first 18x or 2xx relayed for a call: its post-dial delay, in ms.
route[KPI_PDD] {{
    setflag({KPI_RANG_FLAG});
    $var(ms) = ($TV(sn) - $avp(kpi_s)) * 1000 + ($TV(un) - $avp(kpi_u)) / 1000;
    $var(stat) = $avp(kpi) + "_pdd_ms";
    update_stat("$var(stat)", "$var(ms)");
    $var(stat) = $avp(kpi) + "_pdd_calls";
    update_stat("$var(stat)", "+1");
}}

# The final failure the caller gets ($var(code)): by class, and by code for the usual ones.
route[KPI_FAIL] {{
    if ($avp(kpi) == $null) {{
        return;
    }}
    $var(c) = $_s($var(code));
    $var(stat) = $avp(kpi) + "_fail_" + $(var(c){{s.substr,0,1}}) + "xx";
    update_stat("$var(stat)", "+1");
    if ($var(c) =~ "^({kpi_codes})$") {{
        $var(stat) = $avp(kpi) + "_code_" + $var(c);
        update_stat("$var(stat)", "+1");
    }}
}}

# Every INVITE branch sent to an SBC is remembered as it leaves, in the
# request's worker, so that replies (100, 180, 200 come back-to-back) are not
# slowed down: the more work on a provisional, the likelier a worker relays a
# 180 after its 200 (SIPp, unlike phones, counts that as a failed call).
onsend_route {{
    if (is_method("INVITE") && $tt == $null && $avp(ds_set) != $null) {{
        # Remember the branch and the 503 that ends it (our own Via from the buffer
        # being sent: tm matches replies by its branch parameter). The SBC is named
        # by the dispatcher's own URI: what ds_is_active and {FENCED_TABLE} use.
        $var(dst) = $_s(sip:$sndto(ip):$sndto(port));
        if ($xavp(_dsdst_=>uri) != $null) {{
            $var(dst) = $xavp(_dsdst_=>uri);
        }}
        $sht(ringing=>$ci) = $_s($avp(ds_set)|$var(dst)|$cs);
        $sht(ringmsg=>$ci) = "SIP/2.0 {ABANDON_STATUS} SBC Fenced Or Down\\r\\n" + $(snd(buf){{line.sw,Via:}})
            + "\\r\\nFrom: " + $hdr(From) + "\\r\\nTo: " + $hdr(To) + ";tag=hotsite-abandon"
            + "\\r\\nCall-ID: " + $ci
            + "\\r\\nCSeq: " + $hdr(CSeq) + "\\r\\nX-Hotsite-Abandon: " + $var(dst)
            + "\\r\\nContent-Length: 0\\r\\n\\r\\n";
    }}
}}

# Every ringing_check_ms: end pending INVITE branches at fenced or long-dead SBCs.
route[RINGING_CHECK] {{
    $shv(ringtick) = $shv(ringtick) + 1;
    $var(tick) = $shv(ringtick);
    sht_iterator_start("rg", "ringing");
    while (sht_iterator_next("rg")) {{
        $var(ci) = $shtitkey(rg);
        $var(v) = $shtitval(rg);
        $var(set) = $(var(v){{s.select,0,|}}{{s.int}});
        $var(dst) = $(var(v){{s.select,1,|}});
        $var(cseq) = $(var(v){{s.select,2,|}});
        route(RINGING_DST_DOWN);
        if ($var(down) == 1 && $sht(ringdone=>$var(ci)) == $null) {{
            $sht(ringdone=>$var(ci)) = 1;
            xlog("L_NOTICE", "ending the INVITE branch of $var(ci) at $var(dst): $var(why)\\n");
            # CANCEL it at the SBC, then end it here with a 503 of our own.
            if (t_cancel_callid("$var(ci)", "$var(cseq)", "{ABANDON_FLAG}")) {{
                send_data("sip:{address}:{sip}", "$sht(ringmsg=>$var(ci))");
            }}
        }}
    }}
    sht_iterator_end("rg");
}}

# $var(down) = 1 if $var(dst) is fenced, or inactive in the dispatcher for
# ringing_dead_limit_ms (its keepalives failing all that time) while another
# SBC of its set is up.
route[RINGING_DST_DOWN] {{
    $var(down) = 0;
    if ($sht({FENCED_TABLE}=>$var(dst)) != $null) {{
        $var(down) = 1;
        $var(why) = "fenced by hotsite";
        return;
    }}
    if (ds_is_active("$var(set)", "$var(dst)")) {{
        $sht(dsdown=>$var(dst)) = $null;
        return;
    }}
    $var(seen) = $sht(dsseen=>$var(dst));
    $sht(dsseen=>$var(dst)) = $var(tick);
    if ($sht(dsdown=>$var(dst)) == $null || $var(seen) < $var(tick) - 1) {{
        $sht(dsdown=>$var(dst)) = $var(tick);  # first seen down now (or not watched lately)
    }}
    # ...and only if the set has another SBC up to retry at: ending the last
    # hope of a call during a long blip would help no one.
    if ($var(tick) - $sht(dsdown=>$var(dst)) >= {dead_ticks} && ds_is_active("$var(set)")) {{
        $var(down) = 1;
        $var(why) = "inactive in the dispatcher for {t.ringing_dead_limit_ms} ms";
    }}
}}

failure_route[SITE_FAILOVER] {{
    $sht(ringing=>$ci) = $null;
    $sht(ringmsg=>$ci) = $null;
    if (t_is_canceled()) {{
        $var(code) = $T_reply_code;
        route(KPI_FAIL);
        exit;
    }}
    if (t_branch_timeout() || t_check_status("5[0-9][0-9]")) {{
        # Mark this destination inactive + probing, unless it is down or fenced
        # already: marking would lift a fence ("D" becomes "IP").
        if (ds_is_active("$avp(ds_set)", "$xavp(_dsdst_=>uri)")) {{
            ds_mark_dst("ip");
        }}
        if (isflagset({ABANDON_FLAG})) {{
            xlog("L_NOTICE", "retrying $ci, ended while pending at a fenced or dead SBC\\n");
        }}
        if (ds_next_dst()) {{
            t_on_failure("SITE_FAILOVER");
            t_on_reply("SITE_REPLY");
            t_relay();
            exit;
        }}
    }}
    $var(code) = $T_reply_code;  # no retry: the caller gets this final failure
    route(KPI_FAIL);
}}
"""


def _kpi_declarations(trunks: Sequence[str]) -> tuple[str, str]:
    """The statistics to declare (modparam lines) and the htable seed naming each trunk's prefix."""
    declared, seeded = [], []
    for ip in trunks:
        declared += [f'modparam("statistics", "variable", "{name}")' for name in kpis.stat_names(ip)]
        seeded.append(f'    $sht(kpitrunk=>{ip}) = "{kpis.stat_prefix(ip)}";\n')
    return "\n".join(declared), "".join(seeded)


def command(binary: str, cfg: Path, pidfile: Path, rundir: Path) -> list[str]:
    """Foreground (-DD), log to stderr (-E), our own runtime dir (-Y)."""
    return [binary, "-DD", "-E", "-f", str(cfg), "-P", str(pidfile), "-Y", str(rundir), "-m", "64", "-M", "8"]
