"""Start, watch and stop the lab's processes (Kamailio, SIPp, healthd).

Every process runs in the foreground under our control: its own session
(so a signal to its process group reaches Kamailio's children too), stdout and
stderr to a log file in the workdir, stdin from /dev/null.  Inside a namespace
it is launched through ``ip netns exec NS ...``, which execs in place, so the
pid we get is the pid of the service itself.  Every command line references
the workdir, which is how ``down()`` finds leftovers after a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Proc:
    name: str
    host: str
    pid: int
    log: str
    cmd: list[str]

    def to_json(self, workdir: Path) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "alive": alive(self.pid, workdir), "log": self.log}


def start(name: str, host: str, cmd: list[str], log: Path, namespace: str | None) -> Proc:
    full = (["ip", "netns", "exec", namespace] if namespace else []) + cmd
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[popen.pid] = popen
    return Proc(name=name, host=host, pid=popen.pid, log=str(log), cmd=full)


# Popen objects of processes started by this python process: polled so that a
# dead child is reaped and not mistaken for alive (a zombie keeps its pid).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def references(proc: psutil.Process, workdir: Path) -> bool:
    """True when an argument of proc is the workdir or a path under it."""
    root = str(workdir)
    try:
        args = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(a == root or a.startswith(root + "/") or f"={root}/" in a for a in args)


def alive(pid: int, workdir: Path) -> bool:
    """Running (not a zombie) and still ours: its command line names the workdir."""
    popen = _CHILDREN.get(pid)
    if popen is not None:
        # Our own child: poll() is the truth (and reaps it).  Its command line
        # is not checked: between fork and exec it is still python's.
        return popen.poll() is None
    try:
        p = psutil.Process(pid)
        if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
    except psutil.NoSuchProcess:
        return False
    return references(p, workdir)


def exit_code(pid: int) -> int | None:
    popen = _CHILDREN.get(pid)
    return popen.poll() if popen is not None else None


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by pid (each service leads its own)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _gone(p: psutil.Process) -> bool:
    """Exited.  A zombie counts: once our parent is gone, PID 1 reaps it when it likes."""
    try:
        return p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    left = [p for p in procs if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not _gone(p)]
    return left


def terminate(pids: list[int], timeout: float = 3.0) -> list[int]:
    """Stop all of pids (and their children) at once: SIGCONT, SIGTERM, then SIGKILL.

    SIGCONT first because a stopped process (a loopback-mode cut) ignores
    SIGTERM until continued.  Returns the pids that were running.
    """
    me = {os.getpid(), os.getppid()}
    targets: dict[int, psutil.Process] = {}
    for pid in pids:
        if pid in me:
            continue
        try:
            p = psutil.Process(pid)
            group = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for q in group:
            if q.pid not in me and not _gone(q):
                targets[q.pid] = q
    for q in targets.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            q.send_signal(signal.SIGCONT)
            q.send_signal(signal.SIGTERM)
    left = _wait_gone(list(targets.values()), timeout)
    for q in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            q.kill()
    _wait_gone(left, timeout)
    for pid in pids:
        popen = _CHILDREN.pop(pid, None)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.5)
    return [pid for pid in pids if pid in targets]


def find_by_workdir(workdir: Path) -> list[int]:
    """Pids of every process whose command line references the workdir."""
    me = {os.getpid(), os.getppid()}
    return [p.pid for p in psutil.process_iter() if p.pid not in me and references(p, workdir)]


def log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
