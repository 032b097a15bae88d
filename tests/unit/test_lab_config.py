"""Lab building blocks that need no root: topology constants and the Kamailio config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from provisioning.lab import kamailio
from provisioning.lab import topology as topo


def test_topology_is_consistent() -> None:
    names = [h.name for h in topo.HOSTS]
    assert len(set(names)) == len(names)
    for attr in ("netns_addr", "loopback_addr"):
        addrs = [getattr(h, attr) for h in topo.HOSTS]
        assert len(set(addrs)) == len(addrs)
    for h in topo.HOSTS:
        assert h.loopback_addr.startswith("127.")
        assert len(h.core_iface) <= 15 and len(h.namespace) <= 64
        assert h.namespace.startswith(topo.NS_PREFIX)
    assert topo.host("primary").ports() == {"sip": 5060, "http": 8080}
    with pytest.raises(KeyError, match="known"):
        topo.host("nope")


def test_dispatcher_list_keeps_per_call_failover_in_set_1() -> None:
    lines = [
        line.split()
        for line in kamailio.render_dispatcher_list("10.77.0.20", "10.77.0.30").splitlines()
        if not line.startswith("#")
    ]
    assert [(x[0], x[1], x[2], x[3]) for x in lines] == [
        ("1", "sip:10.77.0.20:5060", "0", "10"),  # the primary first...
        ("1", "sip:10.77.0.30:5060", "0", "0"),  # ...the backup when it does not answer
        ("2", "sip:10.77.0.30:5060", "0", "0"),
    ]


@pytest.mark.skipif(kamailio.find_binary() is None, reason="kamailio is not installed")
def test_generated_cfg_passes_kamailio_check(tmp_path: Path) -> None:
    module_dir = kamailio.find_module_dir()
    assert module_dir is not None
    assert kamailio.missing_modules(module_dir) == []
    dlist = tmp_path / "dispatcher.list"
    dlist.write_text(kamailio.render_dispatcher_list("127.0.0.1", "127.0.0.1"))
    cfg = tmp_path / "kamailio.cfg"
    text = kamailio.render_cfg(
        address="127.0.0.1",
        module_dir=module_dir,
        dispatcher_list=dlist,
        rpc_socket=tmp_path / "rpc.sock",
    )
    assert "ds_ping_reply_codes" not in text.replace("ds_ping_reply_codes deliberately", "")
    cfg.write_text(text)
    (tmp_path / "run").mkdir()
    binary = kamailio.find_binary()
    assert binary is not None and shutil.which(binary) or Path(binary).exists()
    r = subprocess.run(
        [binary, "-c", "-f", str(cfg), "-Y", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr[-2000:]
