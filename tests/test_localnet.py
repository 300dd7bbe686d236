"""Local runs must listen on loopback only (cluster/launch/localnet.py).

The two Ray tests start a real single-node Ray (2 CPUs), run two actors that
rendezvous a gloo process group through ``rendezvous.make_store`` and do one
all_reduce, and then, while everything is still up, list the listening
sockets of every process of *that* Ray session and require each one to be
bound to 127.0.0.0/8 or ::1.

Each Ray session runs in its own process group (``start_new_session``), in
its own ``--temp-dir``, with its own ports and auth token, so the tests
neither see nor stop anybody else's Ray; cleanup signals only that group
(and its descendants), never ``ray stop``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cluster.launch import localnet
import nettools
from cluster.rank import rendezvous
from raytools import REPO, RAY_CLI, head_env, own_head, short_tmpdir, stop_session

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)


# Driver used by both tests: "init" mode starts a local Ray itself (importing
# ray *before* apply_loopback_env, the harder case); "job" mode is the
# entrypoint of `ray job submit` and connects with a bare ray.init().
DRIVER = r'''
import json, os, sys, time
mode, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
import ray
from cluster.launch import localnet
from cluster.rank import rendezvous

if mode == "init":
    localnet.apply_loopback_env()
    ray.init(num_cpus=2, _temp_dir=sys.argv[5],
             **localnet.local_ray_init_kwargs(dashboard_port=int(sys.argv[4])))
else:
    ray.init()

try:
    @ray.remote(num_cpus=1)
    class Rank:
        def __init__(self, rank, world):
            self.rank, self.world, self.store = rank, world, None

        def open_store(self):
            self.store = rendezvous.make_store(localnet.LOOPBACK, 0, self.world, 0, 60)
            return self.store.port

        def join(self, port):
            import torch
            import torch.distributed as dist
            if self.store is None:
                self.store = rendezvous.make_store(
                    localnet.LOOPBACK, port, self.world, self.rank, 60)
            import datetime
            os.environ.update(localnet.collective_loopback_env())  # gloo's sockets on loopback
            dist.init_process_group("gloo", store=self.store, rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(seconds=60))
            t = torch.full((4,), float(self.rank + 1))
            dist.all_reduce(t)
            return {"rank": self.rank, "pid": os.getpid(), "sum": t.tolist()}

        def leave(self):
            import torch.distributed as dist
            dist.destroy_process_group()
            self.store = None
            return True

    ranks = [Rank.remote(r, 2) for r in range(2)]
    port = ray.get(ranks[0].open_store.remote(), timeout=60)
    results = ray.get([a.join.remote(port) for a in ranks], timeout=60)
    info = {"driver_pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
            "gcs": ray.get_runtime_context().gcs_address, "store_port": port,
            "results": results}
    with open(ready + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(ready + ".tmp", ready)
    deadline = time.time() + 60
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.2)
    ray.get([a.leave.remote() for a in ranks], timeout=30)
finally:
    if mode == "init":
        ray.shutdown()
print("DRIVER-OK", flush=True)
'''


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _wait_ready(ready: Path, procs, log: Path, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args[:3]} exited rc={p.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"driver not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def _check_session(session: set[int], info: dict, extra_ports=()) -> None:
    listeners = nettools.listening_sockets(session)
    report = "\n".join(f"  {l.process:16} pid={l.pid:<7} {l.addr}:{l.port}" for l in listeners)
    print(f"{len(listeners)} listeners of {len(session)} session processes:\n{report}")
    bad = [l for l in listeners if not nettools.is_loopback(l.addr)]
    assert not bad, f"non-loopback listeners: {bad}\nall:\n{report}"

    # Not vacuous: the session's components and our sockets were all seen.
    names = {l.process for l in listeners}
    assert {"gcs_server", "raylet"} <= names, report
    assert any(n.startswith("ray::DashboardA") for n in names), report
    ports = {l.port for l in listeners}
    for port in (info["store_port"], *extra_ports):
        assert port in ports, f"port {port} not listening:\n{report}"
    per_pid = Counter(l.pid for l in listeners)
    assert per_pid[info["driver_pid"]] >= 1, report  # driver's core-worker gRPC
    for r in info["results"]:
        # worker gRPC + gloo pair listener (+ the TCPStore server on rank 0)
        assert per_pid[r["pid"]] >= (3 if r["rank"] == 0 else 2), report
        assert r["sum"] == [3.0] * 4
    assert info["node_ip"] == localnet.LOOPBACK
    assert info["gcs"].startswith(localnet.LOOPBACK + ":")


@pytest.fixture
def workdir():
    with short_tmpdir("lnx") as path:
        yield path


# ---------------------------------------------------------------------------
# unit tests (no Ray)
# ---------------------------------------------------------------------------


def test_is_loopback():
    for a in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1", "::ffff:7f00:1", "[::1]", "127.0.0.1%lo"):
        assert nettools.is_loopback(a), a
    for a in ("0.0.0.0", "::", "*", "192.0.2.2", "fd00::2", "::ffff:192.0.2.2", ""):
        assert not nettools.is_loopback(a), a


def test_ss_parser():
    assert nettools._split_local("[::ffff:127.0.0.1]:45109") == ("::ffff:127.0.0.1", 45109)
    assert nettools._split_local("*:42807") == ("::", 42807)
    assert nettools._split_local("127.0.0.1%lo:53") == ("127.0.0.1", 53)
    assert nettools._split_local("[fe80::1]%eth0:22") == ("fe80::1", 22)
    assert nettools._split_local("0.0.0.0:2024") == ("0.0.0.0", 2024)


def test_free_port_is_loopback_and_reusable():
    port = rendezvous.free_port()
    with socket.socket() as s:  # SO_REUSEADDR servers can take it (TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((localnet.LOOPBACK, port))


@pytest.mark.timeout(60)
def test_make_store_binds_loopback_only():
    server = rendezvous.make_store(localnet.LOOPBACK, 0, 2, 0, 30)
    client = rendezvous.make_store(localnet.LOOPBACK, server.port, 2, 1, 30)
    client.set("k", "v")
    assert server.get("k") == b"v"
    mine = [l for l in nettools.listening_sockets([os.getpid()]) if l.port == server.port]
    assert mine and all(l.addr == localnet.LOOPBACK for l in mine), mine
    # the /proc fallback sees the same socket
    assert {(l.addr, l.port) for l in nettools._from_proc() if l.pid == os.getpid()} >= {
        (l.addr, l.port) for l in mine
    }
    del client, server


# ---------------------------------------------------------------------------
# Ray: ray.init(...) local cluster
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_ray_init_local_cluster_binds_loopback_only(workdir):
    script = workdir / "driver.py"
    script.write_text(DRIVER)
    ready, go, log = workdir / "ready", workdir / "go", workdir / "driver.log"
    dash = rendezvous.free_port()
    env = head_env(workdir)  # no loopback env: the driver applies it itself
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), "init", str(ready), str(go), str(dash), str(workdir)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        info = _wait_ready(ready, [proc], log, timeout=70)
        session = nettools.process_tree(roots=[proc.pid], pgids=[proc.pid])
        _check_session(session, info, extra_ports=[dash])
        go.touch()
        proc.wait(timeout=30)
        assert proc.returncode == 0 and "DRIVER-OK" in log.read_text(), log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.terminate()  # the driver's finally runs ray.shutdown()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        stop_session(proc.pid)


# ---------------------------------------------------------------------------
# Ray: `ray start --head` + `ray job submit`
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_ray_start_head_and_job_submit_bind_loopback_only(workdir):
    script = workdir / "driver.py"
    script.write_text(DRIVER)
    ready, go, log = workdir / "ready", workdir / "go", workdir / "job.log"
    submit = None
    with own_head(workdir) as head:
        try:
            with open(log, "w") as out:
                submit = subprocess.Popen(
                    [str(RAY_CLI), "job", "submit", "--address", head.dashboard,
                     "--", sys.executable, str(script), "job", str(ready), str(go)],
                    env=head.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                )
            info = _wait_ready(ready, [submit], log, timeout=60)
            session = nettools.process_tree(pgids=[head.pgid])
            _check_session(session, info, extra_ports=head.ports)
            go.touch()
            submit.wait(timeout=30)
            text = log.read_text()
            assert submit.returncode == 0 and "succeeded" in text and "DRIVER-OK" in text, text[-4000:]
        finally:
            if submit is not None and submit.poll() is None:
                submit.kill()
                submit.wait()
