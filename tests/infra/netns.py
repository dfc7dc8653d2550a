"""Two "hosts" on one machine: two network namespaces joined by a veth pair.

Each host has its own namespace (only loopback and its end of the veth), its own address on
a private /24 and its own host name (a UTS namespace per process, plus an ``/etc/hosts``
that ``ip netns exec`` mounts for that namespace), so a process in one host reaches the
other only through the other's veth address. Everything is created for the test and
removed afterwards; the subnet and names are derived from the pytest PID, so concurrent
runs do not collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Host:
    name: str  # host name, resolvable in both namespaces
    netns: str
    address: str
    interface: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host: its network namespace and host name."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *map(str, argv)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs iproute2 (ip) and util-linux (unshare)")
    tag = os.getpid() % 100000
    subnet = f"10.213.{tag % 200 + 20}"
    hosts = tuple(Host(f"e2d2-{tag}-{side}", f"e2d2-{tag}-{side}", f"{subnet}.{i + 1}",
                       f"e2d2v{tag}{side}") for i, side in enumerate("ab"))
    hosts_file = "".join(f"{h.address} {h.name}\n" for h in hosts)
    created: list[Host] = []
    try:
        try:
            for host in hosts:
                _ip("netns", "add", host.netns)
                created.append(host)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
        a, b = hosts
        _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
        for host in hosts:
            _ip("link", "set", host.interface, "netns", host.netns)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.netns, "link", "set", host.interface, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{hosts_file}")
        yield a, b
    finally:
        for host in created:
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
