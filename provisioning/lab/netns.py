"""Namespace plumbing for the lab: namespaces, veth pairs, the bridge, netem.

Why namespaces: the daemon must probe *real* peers over a *real* network path
that a test can cut or degrade (tc netem), on one machine.  Everything here is
pyroute2; only the bits pyroute2 has no call for (none so far) would be
written by hand.

Layout (see topology.py): ``hs-lab-core`` holds bridge ``br0``; each host
namespace gets ``eth0``, whose peer ``v-<host>`` sits on the bridge; the
appliance (root namespace) gets ``hs-appl`` whose peer ``appl`` sits on the
bridge.  Deleting ``hs-lab-core`` destroys every veth pair, so nothing stays
behind in the root namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterable

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from provisioning.lab import topology as topo


def lab_namespaces() -> list[str]:
    """Every namespace whose name starts with the lab prefix, whoever made it."""
    try:
        names = netns.listnetns()
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(topo.NS_PREFIX))


def namespace_pids(name: str) -> list[int]:
    """Pids of processes living in namespace ``name`` (like `ip netns pids`)."""
    try:
        return sorted(netns.ns_pids().get(name, []))
    except OSError:
        return []


def remove_namespace(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"interface {ifname} not found")
    return int(found[0])


def root_link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def delete_root_link(ifname: str) -> bool:
    """Delete a link in the root namespace; True when something was deleted."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
        return True


def root_addresses() -> list[tuple[str, str]]:
    """(interface, address) of every IPv4 address in the root namespace."""
    out: list[tuple[str, str]] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr(family=2):
            out.append((names.get(msg["index"], "?"), msg.get_attr("IFA_ADDRESS")))
    return out


def create_namespace(name: str) -> None:
    """Create an empty namespace with loopback up (raises if it exists)."""
    if name in netns.listnetns():
        raise FileExistsError(errno.EEXIST, f"namespace {name} already exists")
    netns.create(name)
    with NetNS(name, flags=0) as ns:
        ns.link("set", index=_index(ns, "lo"), state="up")


def build(hosts: Iterable[topo.Host], appliance_addr: str) -> None:
    """Create the core namespace + bridge, the appliance veth and every host.

    Raises on the first failure; the caller tears down (``teardown``).
    """
    create_namespace(topo.CORE_NS)
    with NetNS(topo.CORE_NS, flags=0) as core:
        core.link("add", ifname=topo.BRIDGE, kind="bridge")
        bridge = _index(core, topo.BRIDGE)
        core.link("set", index=bridge, state="up")

        # The appliance: root-namespace end hs-appl, bridge end "appl".
        with IPRoute() as root:
            root.link(
                "add",
                ifname=topo.APPLIANCE_IFACE,
                kind="veth",
                peer={"ifname": topo.APPLIANCE_PEER, "net_ns_fd": topo.CORE_NS},
            )
            appl = _index(root, topo.APPLIANCE_IFACE)
            root.addr("add", index=appl, address=appliance_addr, prefixlen=topo.PREFIX_LEN)
            root.link("set", index=appl, state="up")
        core.link("set", index=_index(core, topo.APPLIANCE_PEER), master=bridge, state="up")

        for h in hosts:
            create_namespace(h.namespace)
            core.link(
                "add",
                ifname=h.core_iface,
                kind="veth",
                peer={"ifname": topo.HOST_IFACE, "net_ns_fd": h.namespace},
            )
            core.link("set", index=_index(core, h.core_iface), master=bridge, state="up")
            with NetNS(h.namespace, flags=0) as ns:
                idx = _index(ns, topo.HOST_IFACE)
                ns.addr("add", index=idx, address=h.netns_addr, prefixlen=topo.PREFIX_LEN)
                ns.link("set", index=idx, state="up")


def teardown() -> list[str]:
    """Remove every lab namespace and the appliance veth.  Idempotent.

    Processes inside must be gone first (see processes.kill_namespace), or a
    namespace lingers (unnamed) until they die.
    """
    done: list[str] = []
    for name in lab_namespaces():
        remove_namespace(name)
        done.append(f"removed namespace {name}")
    if delete_root_link(topo.APPLIANCE_IFACE):
        done.append(f"removed link {topo.APPLIANCE_IFACE}")
    return done


def netem_supported() -> tuple[bool, str]:
    """Can this kernel run tc netem?  Tried on a throwaway veth in the core namespace.

    Some kernels (minimal VM/CI kernels) are built without sch_netem; the lab
    then still cuts links (link down) but cannot add loss or delay.
    """
    probe = "hs-netem-probe"
    with NetNS(topo.CORE_NS, flags=0) as core:
        core.link("add", ifname=probe, kind="veth", peer={"ifname": probe + "p"})
        try:
            core.tc("add", "netem", index=_index(core, probe), loss=1)
            return True, ""
        except NetlinkError as exc:
            return False, f"tc netem unavailable in this kernel ({os.strerror(exc.code)})"
        finally:
            core.link("del", index=_index(core, probe))


def _set_netem(namespace: str, ifname: str, **netem: float) -> None:
    with NetNS(namespace, flags=0) as ns:
        idx = _index(ns, ifname)
        _clear(ns, idx)
        ns.tc("add", "netem", index=idx, **netem)


def _clear(ns: IPRoute, idx: int) -> None:
    try:
        ns.tc("del", index=idx)
    except NetlinkError as exc:
        # ENOENT / EINVAL: no root qdisc of ours to delete.
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise


def _bridge_port_state(host: topo.Host, state: str) -> None:
    with NetNS(topo.CORE_NS, flags=0) as core:
        core.link("set", index=_index(core, host.core_iface), state=state)


def impair(host: topo.Host, *, loss_pct: float, delay_ms: float, cut: bool, netem: bool) -> None:
    """Degrade or cut the host's network path.

    With netem: loss and delay apply to the host's eth0 egress (what it sends:
    replies and its own probes), so a request/response sees them once; a cut is
    100% loss on eth0 *and* on its bridge port, so nothing reaches it either.
    Without netem a cut sets the bridge port down: a pulled cable, silent both
    ways (loss/delay are refused by the caller).
    """
    if cut:
        if netem:
            _set_netem(host.namespace, topo.HOST_IFACE, loss=100)
            with NetNS(topo.CORE_NS, flags=0) as core:
                idx = _index(core, host.core_iface)
                _clear(core, idx)
                core.tc("add", "netem", index=idx, loss=100)
        else:
            _bridge_port_state(host, "down")
        return
    params: dict[str, float] = {}
    if loss_pct:
        params["loss"] = loss_pct
    if delay_ms:
        params["delay"] = int(delay_ms * 1000)  # pyroute2 takes microseconds
    heal(host, netem=netem)
    _set_netem(host.namespace, topo.HOST_IFACE, **params)


def heal(host: topo.Host, *, netem: bool) -> None:
    """Undo any impairment: bridge port up, no netem qdisc on either end."""
    _bridge_port_state(host, "up")
    if not netem:
        return
    with NetNS(host.namespace, flags=0) as ns:
        _clear(ns, _index(ns, topo.HOST_IFACE))
    with NetNS(topo.CORE_NS, flags=0) as core:
        _clear(core, _index(core, host.core_iface))


def qdisc_kinds(namespace: str, ifname: str) -> list[str]:
    """Root qdisc kinds on an interface (for status and tests)."""
    with NetNS(namespace, flags=0) as ns:
        idx = _index(ns, ifname)
        return [q.get_attr("TCA_KIND") for q in ns.get_qdiscs(index=idx)]


def running_as_root() -> bool:
    return os.geteuid() == 0


# -- packet loss without netem: nftables ---------------------------------------------
# Minimal kernels (this CI's among them) lack sch_netem but have nf_tables.
# Random loss is then a `numgen random` drop rule on the host's output path,
# like netem's egress loss. Delay has no nftables equivalent and stays skipped.

NFT_TABLE = "hotsite_lab"


def nft_supported() -> tuple[bool, str]:
    if shutil.which("nft") is None:
        return False, "the nft command (nftables) is missing"
    return True, ""


def nft_loss(namespace: str, loss_pct: float) -> None:
    """Drop ``loss_pct`` percent of the host's outgoing packets (replaces an earlier rule)."""
    nft_clear(namespace)
    per_mille = int(round(loss_pct * 10))
    script = (
        f"add table inet {NFT_TABLE}\n"
        f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n"
        f"add rule inet {NFT_TABLE} out numgen random mod 1000 < {per_mille} drop\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "-f", "-"],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )


def nft_clear(namespace: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "delete", "table", "inet", NFT_TABLE],
        check=False,
        capture_output=True,
    )


def nft_partition(namespace: str, peer_address: str) -> None:
    """Drop everything between this namespace and one peer address, both ways."""
    nft_clear(namespace)
    script = (
        f"add table inet {NFT_TABLE}\n"
        f"add chain inet {NFT_TABLE} in {{ type filter hook input priority 0; }}\n"
        f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n"
        f"add rule inet {NFT_TABLE} in ip saddr {peer_address} drop\n"
        f"add rule inet {NFT_TABLE} out ip daddr {peer_address} drop\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "-f", "-"],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
