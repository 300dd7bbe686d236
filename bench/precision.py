"""Precision benchmark on this CPU: the two-tower mesh (2 actors of 1 thread, gloo on loopback)
training in fp32, bf16 and fp16, in one run: the step time, the bytes the towers exchange per step
and the exchange's share of the step, each against fp32's.

bf16 and fp16 halve the exchange's bytes (the activations and their gradients travel in the
compute dtype; cluster/rank/precision.py). Their compute is another matter on a CPU: PyTorch 2.13
runs bf16 through oneDNN (fast only where the CPU has AVX-512 BF16 or AMX) and fp16's matmul and
convolution backward through slow generic kernels, so fp16 is expected to be far slower here. The
GPU figures are bench/gpu_check.sh's. No target on this machine: the figures are reported.

    .venv/bin/python bench/precision.py [--batch-size 32] [--image-size 224] [--steps 2] [--warmup 1]
        [--json PATH]

`--quick` is a smoke run (the suite runs it; its numbers mean nothing).
"""

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cluster.config import TrainConfig  # noqa: E402
from cluster.launch.actor_mesh import ActorMesh  # noqa: E402
from cluster.launch.session import ray_session  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


def measure(precision: str, args) -> dict:
    config = TrainConfig(recipe="bench", towers=2, num_classes=args.num_classes, image_size=args.image_size,
                         resize=args.image_size, batch_size=args.batch_size, precision=precision,
                         train_data="unused", val_data="unused", seed=0, loss_scale=1024.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    workers = ActorMesh.take(config)  # the precisions' meshes are the same processes, configured afresh
    images_ref, labels_ref = workers.put(images), workers.put(labels)
    walls, reports = [], []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        result = workers.train_step(images_ref, labels_ref, 0.001)
        if step >= args.warmup:
            walls.append(time.perf_counter() - started)
            reports.append(result)
    workers.keep()
    step_s = statistics.median(walls)
    exchange_bytes = statistics.median(sum(r.exchange_bytes for r in step) for step in reports)
    share = statistics.median(max(r.exchange_s / r.seconds for r in step) for step in reports)
    return {"precision": precision, "step_s": step_s, "images_per_second": args.batch_size / step_s,
            "exchange_bytes": exchange_bytes, "exchange_share": share,
            "exchange_dtypes": sorted({d for step in reports for r in step for d in r.exchange_dtypes})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/precision.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (32)")
    parser.add_argument("--image-size", type=int, default=224, help="input side (224)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per precision (2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 8 at 63×63, 10 classes, one step")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.num_classes, args.steps, args.warmup = 8, 63, 10, 1, 0
    with ray_session(cpus_wanted=2, dashboard=False, actor_logs=False):  # or the Ray this process has
        rows = [measure(precision, args) for precision in PRECISIONS]
    base = rows[0]
    print(f"two towers on 2 actors × 1 thread, batch {args.batch_size} at {args.image_size}², "
          f"median of {args.steps} step(s)")
    print(f"{'precision':<9} | {'step s':>7} | {'vs fp32':>7} | {'exchange MB/step':>16} | {'vs fp32':>7} | "
          f"exchange share | exchanged as")
    for r in rows:
        print(f"{r['precision']:<9} | {r['step_s']:7.3f} | {r['step_s'] / base['step_s']:6.2f}× | "
              f"{r['exchange_bytes'] / 1e6:16.2f} | {r['exchange_bytes'] / base['exchange_bytes']:6.2f}× | "
              f"{100 * r['exchange_share']:13.1f}% | {', '.join(r['exchange_dtypes'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
