"""Ansible connection to a directory tree through chroot(8): how the image build applies the role.

ansible-core has no chroot connection (it lives in the community.general
collection, which hotsite does not install), and the image build needs only
the three things a connection does: run a command, put a file, fetch a file.
Every path is resolved inside the tree by a process chrooted into it, so a
symbolic link in the image can never make a copy land on the build machine.
The host name (or ``ansible_host``) is the tree's directory on the controller.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from typing import Any

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
    name: hotsite_chroot
    short_description: run tasks inside a directory tree with chroot(8) (the image build)
    description:
        - Runs commands as root inside a root filesystem on the controller, such as a debootstrap tree.
    author: hotsite
    options:
      remote_addr:
        description: The directory of the tree on the controller.
        default: inventory_hostname
        type: str
        vars:
          - name: inventory_hostname
          - name: ansible_host
    extends_documentation_fragment:
        - connection_pipelining
"""

CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


class Connection(ConnectionBase):
    """Commands as ``chroot TREE /bin/sh -c CMD``; files streamed through a chrooted ``cat``."""

    transport = "hotsite_chroot"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def _root(self) -> str:
        return str(self.get_option("remote_addr"))

    def _connect(self) -> Connection:
        root = self._root()
        if os.geteuid() != 0:
            raise AnsibleConnectionFailure(f"hotsite_chroot: chroot into {root} needs root")
        if not os.path.isfile(os.path.join(root, "bin/sh")):
            raise AnsibleConnectionFailure(f"hotsite_chroot: {root} is not a root filesystem (no /bin/sh)")
        self._connected = True
        return self

    def _chrooted(
        self, command: str, stdin: Any = subprocess.PIPE, stdout: Any = subprocess.PIPE
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [CHROOT, self._root(), "/bin/sh", "-c", command],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env={
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root",
                "LANG": "C.UTF-8",
            },
        )

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = self._chrooted(cmd)
        stdout, stderr = proc.communicate(in_data)
        return proc.returncode, stdout, stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        try:
            with open(in_path, "rb") as source:
                proc = self._chrooted(f"cat > {shlex.quote(out_path)}", stdin=source)
                _, stderr = proc.communicate()
        except OSError as exc:
            raise AnsibleError(f"hotsite_chroot: cannot read {in_path}: {exc}") from None
        if proc.returncode != 0:
            raise AnsibleError(
                f"hotsite_chroot: cannot write {out_path} in {self._root()}: {stderr.decode()!r}"
            )

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as target:
            proc = self._chrooted(f"cat {shlex.quote(in_path)}", stdout=target)
            _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise AnsibleError(f"hotsite_chroot: cannot read {in_path} in {self._root()}: {stderr.decode()}")

    def close(self) -> None:
        self._connected = False
