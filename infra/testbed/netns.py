"""Network plumbing of the testbed: one Linux network namespace per host on one bridge.

Every object created here is named with :data:`PREFIX` (namespaces ``dpt-<host>``, the host side
of each veth pair ``dpt-<host>``, the bridge ``dpt-br0``), so teardown touches nothing else. The
bridge has no address and no namespace has a default route: packets between hosts stay on the
bridge, nothing is routed or NATed to the outside (the root namespace cannot reach the hosts
either; use ``Testbed.run_on``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

PREFIX = "dpt-"
BRIDGE = f"{PREFIX}br0"
SUBNET = "198.51.100"  # TEST-NET-2 (RFC 5737): documentation only, never routed


def ns_name(host: str) -> str:
    return f"{PREFIX}{host}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces() -> list[str]:
    """Our namespaces that exist now (``ip netns list`` prints ``name (id: N)``)."""
    out = ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in out if line.startswith(PREFIX)]


def links() -> list[str]:
    out = ip("-o", "link", "show", check=False).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in out if ":" in line]
    return [n for n in names if n.startswith(PREFIX)]


def create(hosts: dict[str, str]) -> None:
    """The bridge, then for each ``host -> address``: a namespace with ``lo`` up and ``eth0``
    (the inner end of a veth pair whose outer end ``dpt-<host>`` is a port of the bridge)."""
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("link", "set", BRIDGE, "up")
    for host, addr in hosts.items():
        ns = ns_name(host)
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", ns, "master", BRIDGE)
        ip("link", "set", ns, "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")


def set_link(host: str, up: bool) -> None:
    """Plug (up) or unplug (down) a host's cable: the bridge side of its veth pair."""
    ip("link", "set", ns_name(host), "up" if up else "down")


def link_state(host: str) -> str:
    """``up``, ``down`` or ``absent``: the administrative state of the host's cable."""
    res = ip("-o", "link", "show", "dev", ns_name(host), check=False)
    if res.returncode:
        return "absent"
    return "up" if ",UP" in res.stdout.split(">")[0] else "down"


def pids_in(host: str) -> list[int]:
    """Every process whose network namespace is the host's (a service and all it spawned)."""
    res = ip("netns", "pids", ns_name(host), check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def kill_host(host: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in the host until none is left; returns those killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := pids_in(host):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pids} in {ns_name(host)} survived SIGKILL")
        time.sleep(0.1)
    return sorted(killed)


def destroy() -> None:
    """Kill what runs in our namespaces, then delete them, their veths and the bridge.
    Safe to run twice and after a crash: it only looks at what exists."""
    for ns in namespaces():
        kill_host(ns.removeprefix(PREFIX))
        ip("netns", "del", ns, check=False)
    for link in links():  # veths go with their namespace; the bridge (or a stray veth) not
        ip("link", "del", link, check=False)
