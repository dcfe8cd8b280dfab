"""Two "nodes" on one Linux machine: network namespaces joined by a veth pair shaped to a link rate.

``python -m examples.bench.harness --link-rate 1Gbit`` runs its two ranks one per namespace, so that gradients cross
a link of that rate (``tc`` token bucket on both ends) instead of loopback, where the network is nearly free. Needs
Linux, root, and ``ip``/``tc`` (iproute2). Only addresses inside the namespaces are used: a random private /30 that no
interface or route of this host covers. Both namespaces are deleted on the way out, also when setup fails
halfway, the body raises, or the process gets SIGINT/SIGTERM.

Example (as root)::

    with two_nodes("100Mbit") as link:
        node = link.nodes[0]
        subprocess.run(node.command(["ip", "-4", "addr"]), check=True)
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distaccum.tools.planner import parse_bandwidth

TBF_LATENCY = "100ms"
_MIN_BURST_BYTES = 128 * 1024  # veth hands tbf GSO packets of up to 64 KiB: a smaller bucket would drop them
_BURST_SECONDS = 0.002  # tokens for 2 ms at the rate, so timer granularity does not cap the rate below it


class LinkUnavailable(RuntimeError):
    """This machine cannot make the namespaces (not Linux, not root, or ``ip``/``tc`` missing)."""


@dataclass(frozen=True)
class Node:
    """One end of the link: a namespace, its veth interface and its address there."""

    namespace: str
    interface: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this node's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def environment(self) -> dict[str, str]:
        """Variables that keep gloo on the veth (it would otherwise pick an interface by hostname)."""
        return {"GLOO_SOCKET_IFNAME": self.interface}


@dataclass(frozen=True)
class TwoNodes:
    """What :func:`two_nodes` built: two nodes and the shaping of the link between them."""

    nodes: tuple[Node, Node]
    rate: str
    """The rate as given (``100Mbit``)."""
    bandwidth_bytes_per_s: float
    """The rate in bytes/s (``planner.parse_bandwidth``), per direction."""
    burst_bytes: int
    subnet: str

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, for results files."""
        return {
            "rate": self.rate,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "shaping": f"tc tbf on both veth ends: rate {self.rate}, burst {self.burst_bytes} B, latency {TBF_LATENCY}",
            "subnet": self.subnet,
            "nodes": [{"namespace": n.namespace, "interface": n.interface, "address": n.address} for n in self.nodes],
        }


def missing_requirements() -> list[str]:
    """What stops :func:`two_nodes` on this machine, each with its fix; empty when it can run."""
    missing = []
    if not sys.platform.startswith("linux"):
        missing.append(f"Linux (this is {sys.platform}): network namespaces are a Linux feature")
    elif os.geteuid() != 0:
        missing.append(f"root (euid is {os.geteuid()}): run as root, e.g. sudo, to create network namespaces")
    missing += [f"`{tool}` on PATH: install iproute2" for tool in ("ip", "tc") if shutil.which(tool) is None]
    return missing


def burst_bytes(bandwidth_bytes_per_s: float) -> int:
    """The token bucket's size for a rate: 2 ms of traffic, at least 128 KiB."""
    return max(_MIN_BURST_BYTES, round(bandwidth_bytes_per_s * _BURST_SECONDS))


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _host_networks() -> list[ipaddress.IPv4Network]:
    addresses = _run(["ip", "-4", "-o", "addr", "show"]).split()
    found = [addresses[i + 1] for i, word in enumerate(addresses[:-1]) if word == "inet"]
    found += [line.split()[0] for line in _run(["ip", "-4", "route", "show"]).splitlines() if line.strip()]
    return [ipaddress.IPv4Network(text, strict=False) for text in found if text[0].isdigit()]


def free_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A random /30 in 10.0.0.0/8 that no address or route of this host overlaps."""
    rng = rng or random.Random()
    taken = _host_networks()
    for _ in range(100):
        subnet = ipaddress.IPv4Network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{4 * rng.randrange(64)}/30")
        if not any(subnet.overlaps(network) for network in taken):
            return subnet
    raise RuntimeError(f"no free /30 in 10.0.0.0/8 after 100 tries; this host uses {taken}")


def _delete(namespaces: list[str]) -> list[str]:
    errors = []
    try:
        listed = {line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()}
    except RuntimeError as error:
        return [str(error)]
    for name in reversed([name for name in namespaces if name in listed]):
        try:
            # Anything still inside was started in a namespace made here: stop it, or the namespace (and the
            # veth) outlive their name.
            for pid in _run(["ip", "netns", "pids", name]).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", name])
        except RuntimeError as error:
            errors.append(str(error))
    return errors


def _on_signal(previous: Any) -> Any:
    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)  # SIGINT's default raises KeyboardInterrupt: the finally below cleans up
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)  # unwind through the finally instead of dying with the namespaces

    return handler


@contextlib.contextmanager
def two_nodes(rate: str) -> Iterator[TwoNodes]:
    """Two network namespaces joined by a veth pair shaped to ``rate``, deleted on exit.

    Args:
        rate: link rate per direction, as ``distaccum plan --bandwidth`` reads it (``100Mbit``, ``10Gbit``).

    Raises:
        LinkUnavailable: not Linux, not root, or ``ip``/``tc`` missing (the message names the fix).
        ValueError: ``rate`` is not a bandwidth.
        RuntimeError: an ``ip``/``tc`` command failed (its stderr is in the message).
    """
    bandwidth = parse_bandwidth(rate)
    missing = missing_requirements()
    if missing:
        raise LinkUnavailable("two nodes over a shaped link need " + "; ".join(missing))
    tag = f"da{os.getpid()}{random.randrange(16**4):04x}"  # <= 13 characters: interface names stop at 15
    names = (f"{tag}n0", f"{tag}n1")
    subnet = free_subnet()
    hosts = list(subnet.hosts())
    link = TwoNodes(
        nodes=(Node(names[0], f"{tag}v0", str(hosts[0])), Node(names[1], f"{tag}v1", str(hosts[1]))),
        rate=rate,
        bandwidth_bytes_per_s=bandwidth,
        burst_bytes=burst_bytes(bandwidth),
        subnet=str(subnet),
    )
    created: list[str] = []
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_signal(previous[signum]))
    try:
        for name in names:
            created.append(name)  # before it exists: a signal between the two must not leak it
            _run(["ip", "netns", "add", name])
        a, b = link.nodes
        # Both ends are made inside their namespaces: nothing is ever added to the host's own network.
        veth = ["type", "veth", "peer", "name", b.interface, "netns", b.namespace]
        _run(["ip", "link", "add", a.interface, "netns", a.namespace, *veth])
        for node in link.nodes:
            _run(
                ["ip", "-n", node.namespace, "addr", "add", f"{node.address}/{subnet.prefixlen}", "dev", node.interface]
            )
            _run(["ip", "-n", node.namespace, "link", "set", "lo", "up"])
            _run(["ip", "-n", node.namespace, "link", "set", node.interface, "up"])
            shaping = ["rate", f"{round(bandwidth * 8)}bit", "burst", str(link.burst_bytes), "latency", TBF_LATENCY]
            _run(["tc", "-n", node.namespace, "qdisc", "add", "dev", node.interface, "root", "tbf", *shaping])
        yield link
    finally:
        pending: list[int] = []
        for signum in previous:  # a signal now must not cut the cleanup short: deliver it once it is done
            signal.signal(signum, lambda signum, frame: pending.append(signum))
        errors = _delete(created)
        for signum, old in previous.items():
            signal.signal(signum, old)
        for caught in pending[:1]:
            signal.raise_signal(caught)
        if errors:
            raise RuntimeError("could not delete the bench's network namespaces:\n" + "\n".join(errors))
