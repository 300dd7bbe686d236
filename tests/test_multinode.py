"""A real multi-node Ray cluster on one machine: a head with no CPUs and two worker nodes, each a
separate `ray start` on 127.0.0.1 with its own raylet and resources. The driver's job spans them:
one replica per node (both towers of a replica together), the same weights as the same job on one
node; a worker node lost mid-run (its processes killed) is survived once capacity comes back, and reported
clearly when it does not. The module's tests share one head (`cluster`); each starts with two live
worker nodes, new ones joining in place of those an earlier test killed."""

import contextlib
import re
import subprocess
import sys
import time

import pytest
import torch

from cluster.ckpt import checkpoint
import nettools
from cluster.driver import main
from cluster.ckpt.consolidate import consolidate
from parity import assert_rel_close
from raytools import REPO, own_head, short_tmpdir, worker_node
from runs import TINY_MODEL, shard_tensors

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)

DRIVER = [sys.executable, str(REPO / "cluster" / "driver.py")]
# A lost node is noticed in ~3 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
STEPS = 8


def job_args(demo, run_dir, *extra) -> list[str]:
    """2 replicas × 2 towers of 4 images (global batch 8), a checkpoint every 2 steps."""
    return ["--train-data", demo.train_pattern, "--val-data", demo.val_pattern, *TINY_MODEL, "--batch-size", "4",
            "--replicas", "2", "--epochs", "2",
            "--max-steps", str(STEPS), "--checkpoint-every", "2", "--log-every", "1", "--run-dir", str(run_dir),
            "--placement-timeout-s", "60", "--dropout", "0", *extra]


class Cluster:
    """The module's head (no CPUs, health checks every second) and the worker nodes joined to it."""

    def __init__(self, head, tmp, stack: contextlib.ExitStack):
        self.head, self.tmp, self._stack, self._nodes = head, tmp, stack, []

    def add(self):
        """Join a new worker node of 4 CPUs; it stays until the module ends (or a test kills it)."""
        node = self._stack.enter_context(worker_node(self.head, self.tmp, f"node_{len(self._nodes)}"))
        self._nodes.append(node)
        return node

    def two_live_nodes(self) -> list:
        """Two worker nodes whose raylets run: those left by the tests before, then new ones."""
        live = [node for node in self._nodes if not node.killed][:2]
        return live + [self.add() for _ in range(2 - len(live))]


@pytest.fixture(scope="module")
def cluster():
    with short_tmpdir("mn") as tmp, contextlib.ExitStack() as stack:
        head = stack.enter_context(own_head(tmp, num_cpus=0, extra_env=FAST_HEALTH_CHECKS))
        yield Cluster(head, tmp, stack)


@pytest.fixture(scope="module")
def single_node_run(tiny_demo, tmp_path_factory, local_ray):
    """The same job on one node (a local Ray in this process): its last checkpoint."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(job_args(tiny_demo, run_dir)) == 0
    return run_dir / f"checkpoint-{STEPS:08d}"


@pytest.fixture(scope="module")
def single_node_weights(single_node_run):
    """What every multi-node variant must reach, bit for bit."""
    return shard_tensors(single_node_run)


def test_two_replicas_of_four_images_train_like_one_replica_of_eight(tiny_demo, single_node_run, tmp_path, shared_ray):
    """The replicas read disjoint halves of each global batch (the readers' split) and average
    their gradients: the weights are those of one replica reading all 8 images (dropout is off;
    tolerance: tests/parity.py). And the 2-replica checkpoint re-splits into 1 replica and goes
    on to the same weights as the 1-replica run."""
    def one_replica(run_dir, *extra):
        args = job_args(tiny_demo, run_dir, "--max-steps", str(STEPS + 4), *extra)
        args[args.index("--replicas") + 1], args[args.index("--batch-size") + 1] = "1", "8"
        return args

    assert main(one_replica(tmp_path / "one")) == 0
    assert main(one_replica(tmp_path / "resplit", "--resume", str(single_node_run))) == 0
    for ours, reference in ((single_node_run, tmp_path / "one" / f"checkpoint-{STEPS:08d}"),
                            (tmp_path / "resplit" / f"checkpoint-{STEPS + 4:08d}",
                             tmp_path / "one" / f"checkpoint-{STEPS + 4:08d}")):
        _, ours_state = consolidate(str(ours))
        _, reference_state = consolidate(str(reference))
        assert ours_state.keys() == reference_state.keys()
        for name in reference_state:
            assert_rel_close(ours_state[name], reference_state[name], f"{ours.parent.name}: {name}")


def run_driver(head, args, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(DRIVER + args + ["--address", f"127.0.0.1:{head.gcs_port}"], cwd=REPO, env=head.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def placement_rows(out: str) -> list[list[str]]:
    """The rows (rank, replica, stage, tower, node, ...) of the first placement table printed:
    the 4 tower actors, then the loaders (rank L<replica>.<loader>)."""
    table = out.split("placement:\n", 1)[1].splitlines()[1:]
    return [line.split() for line in table[:table.index(next(line for line in table if line.startswith("precision:")))]]


def wait_for(path, proc, log, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path} never appeared:\n{log.read_text()[-4000:]}"
        time.sleep(0.3)


@pytest.mark.timeout(420)
def test_a_job_spanning_two_worker_nodes_equals_the_single_node_run(tiny_demo, single_node_weights, cluster, tmp_path):
    node_a, node_b = cluster.two_live_nodes()
    head = cluster.head
    proc = run_driver(head, job_args(tiny_demo, tmp_path / "run", "--loaders-per-replica", "2"), tmp_path / "driver.log")
    listeners = set()
    while proc.poll() is None:  # the three nodes' and the job's sockets, while it runs
        tree = nettools.process_tree(roots=[proc.pid], pgids=[proc.pid, head.pgid, node_a.pgid, node_b.pgid])
        listeners.update((l.process, l.addr) for l in nettools.listening_sockets(tree))
        time.sleep(0.5)
    assert {process for process, _ in listeners} >= {"raylet", "gcs_server"}
    assert all(nettools.is_loopback(addr) for _, addr in listeners), listeners
    out = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    rows = placement_rows(out)
    assert [row[:4] for row in rows] == [["0", "0", "0", "0"], ["1", "0", "0", "1"], ["2", "1", "0", "0"],
                                         ["3", "1", "0", "1"], ["L0.0", "0", "0", "-"], ["L0.1", "0", "0", "-"],
                                         ["L1.0", "1", "0", "-"], ["L1.1", "1", "0", "-"]], out
    nodes = [row[4] for row in rows]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], out  # towers together,
    # replicas apart, and each replica's loaders on the node of its stage 0 (both its towers)
    assert nodes[4] == nodes[5] == nodes[0] and nodes[6] == nodes[7] == nodes[2], out
    assert re.search(r"^decoded: replica 0 loader 0 \d+, replica 0 loader 1 \d+, replica 1 loader 0 \d+, "
                     r"replica 1 loader 1 \d+; the driver 0$", out, re.MULTILINE), out[-2000:]
    assert f"done: {STEPS} steps" in out, out[-3000:]
    weights = shard_tensors(tmp_path / "run" / f"checkpoint-{STEPS:08d}")
    assert weights.keys() == single_node_weights.keys()
    assert all(torch.equal(weights[name], single_node_weights[name]) for name in weights)


@pytest.mark.timeout(480)
def test_a_lost_worker_node_is_survived_once_capacity_returns(tiny_demo, single_node_weights, cluster, tmp_path):
    _, node_b = cluster.two_live_nodes()
    head = cluster.head
    proc = run_driver(head, job_args(tiny_demo, tmp_path / "run", "--restart-wait-s", "120"), tmp_path / "driver.log")
    wait_for(tmp_path / "run" / "checkpoint-00000004" / checkpoint.MANIFEST, proc, tmp_path / "driver.log")
    node_b.lose()
    time.sleep(5)  # the mesh is down and waiting for a node
    cluster.add()
    proc.wait(timeout=360)
    out = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"restart 1/3: \w+", out), out[-4000:]
    assert f"done: {STEPS} steps" in out, out[-3000:]
    weights = shard_tensors(tmp_path / "run" / f"checkpoint-{STEPS:08d}")
    assert all(torch.equal(weights[name], single_node_weights[name]) for name in weights)


@pytest.mark.timeout(420)
def test_a_lost_worker_node_that_does_not_come_back_stops_the_run_clearly(tiny_demo, cluster, tmp_path):
    _, node_b = cluster.two_live_nodes()
    head = cluster.head
    # the first start of the six actors on freshly joined nodes has 60 s (with 30 s a CI run on 2
    # loaded cores stopped before its first checkpoint); the restart waits 10 s for the lost node
    proc = run_driver(head, job_args(tiny_demo, tmp_path / "run", "--restart-wait-s", "10"), tmp_path / "driver.log")
    wait_for(tmp_path / "run" / "checkpoint-00000002" / checkpoint.MANIFEST, proc, tmp_path / "driver.log")
    node_b.lose()
    proc.wait(timeout=300)
    out = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 1, out[-4000:]
    assert re.search(r"error: training failed: replica 1 stage 0 needs \{CPU: 3\} on one node .* \(waited 10 s\)",
                     out), out[-4000:]
