"""What many tests share: a seconds-long driver run's arguments, the driver as a command, its
checkpoints' tensors and progress losses, and the check that a run left no process behind."""

import os
import re
import sys
import time

import torch

from cluster.ckpt import checkpoint
from cluster.rank.pipeline import StepPlan
from cluster.rank.worker import TowerWorker
from parity import FC_WIDTH, small_config
from raytools import REPO
import nettools

DRIVER = [sys.executable, str(REPO / "cluster" / "driver.py")]
STEP_LOSS = re.compile(r"^step (\d+)/\d+ \| epoch \d+/\d+ \| loss ([\d.]+)", re.MULTILINE)


# The driver runs' network: the demo's ten classes, 72×72 images cropped to 64×64 (maps
# 15/7/3/1), fc6 and fc7 of parity.FC_WIDTH units.
TINY_MODEL = ["--num-classes", "10", "--image-size", "64", "--resize", "72", "--fc-width", str(FC_WIDTH)]


def tiny_run_args(demo, run_dir, *extra) -> list[str]:
    # TINY_MODEL in 8-image batches: seconds per run. No report plots (a second of matplotlib a
    # run) unless a test asks for them with --report. The CPU's own kernels (the demo recipe pins
    # AVX2, test_the_demo_pins_its_cpu_kernels checks it), so that the actors need no runtime env
    # of their own (half a second each) and compute as this process.
    return ["--train-data", demo.train_pattern, "--val-data", demo.val_pattern, *TINY_MODEL, "--batch-size", "8",
            "--epochs", "1", "--run-dir", str(run_dir), "--log-every", "2", "--no-report", "--cpu-isa", "auto",
            *extra]


def losses(out: str) -> dict[int, str]:
    return {int(step): loss for step, loss in STEP_LOSS.findall(out)}


def shard_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of every shard of checkpoint `directory` (a path, or a URI: cluster/ckpt/storage.py)."""
    tensors = {}
    for shard in checkpoint.read_manifest(str(directory))[checkpoint.KEY_SHARDS]:
        state = checkpoint.load_shard(str(directory), shard["file"])
        for name, value in state.get(checkpoint.SHARD_MODEL, {}).items():  # replica 0's shards only
            tensors[f"{shard['file']}:{name}"] = value
        for index, slot in state.get(checkpoint.SHARD_OPTIMIZER, {"state": {}})["state"].items():
            tensors[f"{shard['file']}:velocity {index}"] = slot["velocity"]
        tensors[f"{shard['file']}:rng"] = state[checkpoint.SHARD_RNG]
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """`shard_tensors` of two checkpoints: the same names, every tensor bitwise equal."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


PLACEMENT_ROW = re.compile(r"^(\d+|L\d+\.\d+) +.* (\d+)$", re.MULTILINE)  # rank or L<replica>.<loader>, pid


def placement_tables(out: str) -> list[list[tuple[str, int]]]:
    """Each placement table the driver printed in `out` (one a mesh): (rank, or L<replica>.<loader>
    for a loader, pid) of each of its actors."""
    return [[(row, int(pid)) for row, pid in PLACEMENT_ROW.findall(table.split("\nprecision:")[0])]
            for table in out.split("placement:\n")[1:]]


def placement_pids(out: str) -> list[list[int]]:
    """The tower actors' pids of each placement table the driver printed in `out`."""
    return [[pid for row, pid in table if not row.startswith("L")] for table in placement_tables(out)]


def _until_none_left(left, grace_s: float, what: str) -> None:
    """Poll `left()` until it is empty, for up to `grace_s`; else fail naming what was left."""
    deadline = time.monotonic() + grace_s
    while (found := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not found, f"{what} left behind: {sorted(found)}"


def assert_nothing_left(pgid: int, grace_s: float = 15.0) -> None:
    """Every process of the driver's session has exited (Ray's own take a moment after the driver)."""
    _until_none_left(lambda: nettools.process_tree(pgids=[pgid]), grace_s, "processes")


def assert_gone(pids: list[int], grace_s: float = 15.0) -> None:
    """Every one of `pids` has exited (Ray ends a finished driver's actors a moment after it)."""
    _until_none_left(lambda: [pid for pid in pids if os.path.exists(f"/proc/{pid}")], grace_s, "actors")


STEP = StepPlan("train", microbatches=1, rows=4, lr=0.01)  # one whole-batch step of 4 images


def one_process_worker() -> TowerWorker:
    # one process holding both towers (no process group needed); 63×63 input keeps it quick
    config = small_config(batch_size=4, towers=1, seed=3)
    return TowerWorker(config, rank=0)
