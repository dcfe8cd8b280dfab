"""The bench harness's ``--link-rate``: two nodes in network namespaces over a shaped veth link, and their cleanup.

The namespace tests need Linux, root and iproute2 (CI runs as root) and skip with the reason elsewhere; the
option checks run everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distaccum.tools.planner import build_report
from examples.bench import harness
from examples.bench.harness import BenchConfig, netns, run_benchmark
from examples.bench.harness import launch as bench_launch

MISSING = netns.missing_requirements()
needs_netns = pytest.mark.skipif(bool(MISSING), reason="two nodes in network namespaces need " + "; ".join(MISSING))
ACCUM_STEPS = 3
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def link_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real run of the tiny MLP as two nodes over 100 Mbit/s (then on loopback), read back from --json."""
    if MISSING:
        pytest.skip("two nodes in network namespaces need " + "; ".join(MISSING))
    out = tmp_path_factory.mktemp("bench-netns") / "bench.json"
    argv = [
        "--size", "tiny", "--models", "mlp", "--accum-steps", str(ACCUM_STEPS), "--methods", "sync_every",
        "distaccum", "--warmup", "1", "--rounds", "2", "--no-memory", "--memory-sweep", "--link-rate", "100Mbit",
        "--timeout", "120", "--json", str(out),
    ]  # fmt: skip
    assert harness.main(argv) == 0
    return json.loads(out.read_text())


@needs_netns
def test_two_node_run_completes_and_removes_its_namespaces(link_run):
    link = link_run["link"]
    assert link["rate"] == "100Mbit" and link["bandwidth_bytes_per_s"] == 12.5e6
    names = {node["namespace"] for node in link["nodes"]}
    assert len(names) == 2 and not names & _namespaces()
    assert link_run["command"].endswith("--link-rate 100Mbit")


@needs_netns
def test_reductions_over_the_link_are_counted_as_on_loopback(link_run):
    (case,), (loopback,) = link_run["cases"], link_run["loopback_cases"]
    for name in ("sync_every", "distaccum"):
        counted = case["methods"][name]["gradient_reductions_per_step"]
        assert counted == loopback["methods"][name]["gradient_reductions_per_step"], name
    assert case["methods"]["sync_every"]["gradient_reductions_per_step"] == ACCUM_STEPS  # tiny: one bucket
    assert case["methods"]["distaccum"]["gradient_reductions_per_step"] == 1
    (row,) = link_run["link_comparison"]
    assert row["methods"]["sync_every"]["full_gradient_all_reduces_per_step"] == ACCUM_STEPS
    assert row["methods"]["distaccum"]["full_gradient_all_reduces_per_step"] == 1


@needs_netns
def test_the_estimate_is_distaccum_plans(link_run):
    (case,), (row,) = link_run["cases"], link_run["link_comparison"]
    micro = case["micro_batch_size"]
    plan_args = argparse.Namespace(
        **{"global_batch_size": micro * ACCUM_STEPS * 2, "micro_batch_size": micro, "world_size": 2},
        **{"params": case["gradient"]["params"], "dtype": "fp32", "bandwidth": 12.5e6, "latency": 20e-6},
        **{"nodes": 2, "replicas": None},
    )
    plan = build_report(plan_args)["per_step"]
    for method, mode in (("sync_every", "every_micro_batch"), ("distaccum", "distaccum")):
        entry = row["methods"][method]
        assert entry["estimated_comm_s"] == pytest.approx(plan[mode]["estimate_s"], rel=1e-12), method
        loopback = link_run["loopback_cases"][0]["methods"][method]["median_s"]
        assert entry["estimated_comm_plus_loopback_s"] == pytest.approx(entry["estimated_comm_s"] + loopback)


@needs_netns
def test_the_link_is_shaped_to_its_rate():
    # The tiny bench moves a few KiB, which the token bucket's burst lets through at once: time a bulk transfer.
    size, rate = 2_000_000, "20Mbit"
    server = textwrap.dedent("""
        import socket, sys
        listener = socket.create_server((sys.argv[1], 0))
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        received = 0
        while chunk := conn.recv(1 << 16):
            received += len(chunk)
        conn.sendall(str(received).encode())
    """)
    client = textwrap.dedent("""
        import socket, sys, time
        start = time.perf_counter()
        with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as conn:
            conn.sendall(bytes(int(sys.argv[3])))
            conn.shutdown(socket.SHUT_WR)
            received = conn.recv(64).decode()
        print(received, time.perf_counter() - start)
    """)
    with netns.two_nodes(rate) as link:
        a, b = link.nodes
        listening = subprocess.Popen(b.command([sys.executable, "-c", server, b.address]), stdout=subprocess.PIPE)
        try:
            port = listening.stdout.readline().decode().strip()  # type: ignore[union-attr]
            argv = [sys.executable, "-c", client, b.address, port, str(size)]
            done = subprocess.run(a.command(argv), capture_output=True, text=True, timeout=30, check=True)
        finally:
            listening.kill()
            listening.wait()
    received, seconds = done.stdout.split()
    assert int(received) == size
    floor = (size - link.burst_bytes) / link.bandwidth_bytes_per_s  # 0.75 s; unshaped loopback takes ~1 ms
    assert float(seconds) >= 0.9 * floor, (seconds, floor)


@needs_netns
def test_namespaces_are_removed_when_the_run_fails_inside_them(monkeypatch):
    seen: dict[str, set[str]] = {}

    def failing_launch(job, nproc, timeout_s, workdir, *, nodes=None):
        seen["ours"] = {node.namespace for node in nodes}
        seen["listed"] = _namespaces()
        raise RuntimeError("bench job time failed: rank 1 exited 1")

    monkeypatch.setattr(bench_launch, "launch", failing_launch)
    config = BenchConfig(size="tiny", models=("mlp",), methods=("distaccum",), memory=False, memory_sweep=())
    with pytest.raises(RuntimeError, match="rank 1 exited 1"):
        run_benchmark(BenchConfig(**{**config.__dict__, "link_rate": "100Mbit"}), log=lambda line: None)
    assert len(seen["ours"]) == 2 and seen["ours"] <= seen["listed"]
    assert not seen["ours"] & _namespaces()


@needs_netns
def test_namespaces_are_removed_when_setup_fails_halfway(monkeypatch):
    run, added = netns._run, []

    def failing_tc(argv):
        if argv[0] == "tc":
            raise RuntimeError("`tc qdisc add` failed (exit 2): Error: Specified qdisc kind is unknown.")
        if argv[:3] == ["ip", "netns", "add"]:
            added.append(argv[3])
        return run(argv)

    monkeypatch.setattr(netns, "_run", failing_tc)
    with pytest.raises(RuntimeError, match="qdisc kind is unknown"), netns.two_nodes("1Gbit"):
        pytest.fail("the body ran although setup failed")
    assert len(added) == 2 and not set(added) & _namespaces()


@needs_netns
def test_namespaces_are_removed_on_sigterm_and_the_handler_restored():
    script = textwrap.dedent("""
        import signal, sys, time
        from examples.bench.harness.netns import two_nodes
        before = signal.getsignal(signal.SIGTERM)
        try:
            with two_nodes("1Gbit") as link:
                print(" ".join(node.namespace for node in link.nodes), flush=True)
                time.sleep(60)
        finally:
            print("restored" if signal.getsignal(signal.SIGTERM) == before else "not restored", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    names = set(child.stdout.readline().split())  # type: ignore[union-attr]
    assert len(names) == 2 and names <= _namespaces()
    time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    rest, _ = child.communicate(timeout=30)
    assert child.returncode == 128 + signal.SIGTERM
    assert rest.strip() == "restored"
    assert not names & _namespaces()


def test_link_rate_needs_two_ranks_and_a_rate():
    with pytest.raises(ValueError, match="nproc 4 with link_rate 1Gbit: two nodes run one rank each; use --nproc 2"):
        BenchConfig(nproc=4, link_rate="1Gbit")
    with pytest.raises(ValueError, match="'fast' is not a bandwidth"):
        BenchConfig(link_rate="fast")


def test_without_root_the_command_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000, raising=False)
    argv = ["--size", "tiny", "--models", "mlp", "--methods", "distaccum", "--link-rate", "1Gbit"]
    assert harness.main(argv) == 2
    error = capsys.readouterr().err
    assert "python -m examples.bench.harness: error: two nodes over a shaped link need" in error
    assert ("run as root" if sys.platform.startswith("linux") else "Linux") in error
