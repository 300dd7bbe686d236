"""Checkpoint benchmark: save and load of the full paper network (60,965,224 parameters and their
momentum, one shard) against this disk's plain sequential write in the same run, and the training
stall of a synchronous against an asynchronous save.

What one run measures, in one process holding both towers (`TowerWorker`, towers = 1, 224×224,
1000 classes, one thread), in the directory given by `--dir` (default: a temporary directory
under the run's working directory, on the same disk as `runs/`):

    disk      writing the shard's size of random bytes to a new file, then fsync: the floor;
    save      `TowerWorker.save` (torch.save to a temporary file, fsync, rename, sha256):
              seconds and MB/s, against the disk's;
    load      `TowerWorker.load` (torch.load(weights_only=True), load_state_dict): seconds and
              MB/s. The file was just written, so it is read from the page cache (clearing that
              needs root): this is the deserialising cost, not the disk's read speed;
    stall     how much longer a training step (batch `--batch-size`) takes when a checkpoint is
              taken before it: synchronously (save, then the step) or asynchronously (copy the
              state, the step while a thread writes, then wait for the write), against the
              median plain step.

Medians of `--repeats`. Run from the repository root, alone on the machine (about 2 minutes):

    .venv/bin/python bench/checkpoint.py [--repeats 3] [--batch-size 16] [--dir DIR] [--json PATH]

`--quick` is a smoke run of every part on a small network (the suite runs it).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cluster.config import TrainConfig  # noqa: E402
from cluster.rank.pipeline import StepPlan  # noqa: E402
from cluster.rank.worker import TowerWorker  # noqa: E402

MB = 1e6


def disk_write_seconds(directory: str, size: int) -> float:
    """Seconds to write `size` random bytes to a new file and fsync it."""
    block = os.urandom(1 << 24)
    path = os.path.join(directory, "disk-floor.bin")
    started = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dir", default="", help="where the shards are written (default: a temporary directory here)")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="a smoke run for the test suite: a 63×63, 10-class "
                                                              "network (a few MB), batch 2, one repeat")
    args = parser.parse_args(argv)
    size, classes = 224, 1000
    if args.quick:
        args.repeats, args.batch_size, size, classes = 1, 2, 63, 10
    root = tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir or os.getcwd())
    config = TrainConfig(recipe="bench", num_classes=classes, image_size=size, resize=size, batch_size=args.batch_size,
                         towers=1, train_data="unused", val_data="unused", threads_per_worker=1)
    worker = TowerWorker(config, rank=0)
    params = sum(p.numel() for p in worker.model.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (args.batch_size,), generator=g)
    plan = StepPlan("train", microbatches=1, rows=args.batch_size, lr=0.001)

    def step() -> float:
        started = time.perf_counter()
        worker.train_step(plan, images, labels)
        return time.perf_counter() - started

    try:
        step()  # momentum exists from here on; warm-up
        results = {"parameters": params, "save_s": [], "load_s": [], "disk_s": [], "plain_step_s": [],
                   "sync_step_s": [], "async_step_s": [], "async_copy_s": [], "async_wait_s": []}
        for i in range(args.repeats):
            directory = os.path.join(root, f"sync-{i}")
            os.makedirs(directory)
            started = time.perf_counter()
            entry = worker.save(directory)
            results["save_s"].append(time.perf_counter() - started)
            results["bytes"] = entry["bytes"]
            results["disk_s"].append(disk_write_seconds(root, entry["bytes"]))
            started = time.perf_counter()
            worker.load(directory)
            results["load_s"].append(time.perf_counter() - started)
            shutil.rmtree(directory)
        for i in range(args.repeats):
            results["plain_step_s"].append(step())
            directory = os.path.join(root, f"stall-sync-{i}")
            os.makedirs(directory)
            started = time.perf_counter()
            worker.save(directory)
            step()
            results["sync_step_s"].append(time.perf_counter() - started)
            directory = os.path.join(root, f"stall-async-{i}")
            os.makedirs(directory)
            started = time.perf_counter()
            worker.save(directory, asynchronous=True)
            copied = time.perf_counter()
            step()
            stepped = time.perf_counter()
            worker.finish_save()
            done = time.perf_counter()
            results["async_step_s"].append(done - started)
            results["async_copy_s"].append(copied - started)
            results["async_wait_s"].append(done - stepped)
        worker.finish_save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def report(r: dict, args) -> None:
    med = {key: statistics.median(r[key]) for key in r if key.endswith("_s")}
    size = r["bytes"] / MB
    print(f"torch {torch.__version__}; full network: {r['parameters']:,} parameters + momentum, one shard of "
          f"{size:.0f} MB; medians of {args.repeats}")
    print(f"{'':28} | {'seconds':>8} | {'MB/s':>7} | vs disk")
    print("-" * 60)
    disk = size / med["disk_s"]
    for name, key in (("disk: write + fsync", "disk_s"), ("save (sync)", "save_s"), ("load (page cache)", "load_s")):
        rate = size / med[key]
        print(f"{name:28} | {med[key]:8.2f} | {rate:7.0f} | {rate / disk:6.2f}×")
    plain = med["plain_step_s"]
    print(f"training step of {args.batch_size} images: {plain:.2f} s")
    print(f"  with a synchronous checkpoint before it:  {med['sync_step_s']:.2f} s (stall {med['sync_step_s'] - plain:.2f} s)")
    print(f"  with an asynchronous one:                 {med['async_step_s']:.2f} s (stall {med['async_step_s'] - plain:.2f} s: "
          f"copy {med['async_copy_s']:.2f} s, then waiting {med['async_wait_s']:.2f} s for the write after the step)")


if __name__ == "__main__":
    sys.exit(main())
