"""Actor start benchmark: the CPU seconds a fresh process spends becoming a tower actor, and a
loader actor, ours against what each did before, in one run.

Each sample is a fresh interpreter (as Ray starts one per actor). Its CPU time is the child's user
+ system time (`getrusage(RUSAGE_CHILDREN)`), start to exit; its memory, its peak resident size.

Tower actor: the child imports the tower actor's module, builds a `TowerWorker` (both towers in
one process, the tests' 63×63 network with the paper's fc widths) and takes its optimizer's state
dict, as a checkpoint does.
- **baseline**: `PaperSGD` with `torch.optim.Optimizer`'s methods as torch ships them, each wrapped
  in `torch._disable_dynamo`, whose first call imports torch._dynamo (what the code did before).
- **ours**: `PaperSGD` as it is (stages/optim.py uses those methods as written: nothing imports
  torch._dynamo).

Loader actor: the child imports the loader actor's module, builds a `LoaderWorker` on the train
and validation readers of a small demo dataset (full-size images, the tests' 72 → 64 views) and
makes one training and one validation batch.
- **baseline**: the same, with PyTorch imported first, as every loader actor imported it until
  2026-12-07 (its batches were tensors, its evaluation views resized by torch).
- **ours**: as it is (numpy batches, every resize in data._jpegroi: no PyTorch in the process).

The samples alternate baseline/ours; the figures are medians. Each ratio is ours / baseline (lower
is better). Run alone on the machine:

    .venv/bin/python bench/actor_start.py [--samples 7] [--data DIR] [--json PATH]

`--quick` is a smoke run (the suite runs it; its numbers mean nothing).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import re
import sys
import torch
from torch.optim import Optimizer
from cluster.config import TrainConfig
from cluster.rank.worker import TowerWorker
from stages.optim import PaperSGD
if sys.argv[1] == "baseline":  # the methods PaperSGD takes unwrapped, as torch ships them: in torch._disable_dynamo
    for name, method in vars(Optimizer).items():
        if hasattr(method, "__wrapped__") and name in vars(PaperSGD):
            setattr(PaperSGD, name, method)
config = TrainConfig(recipe="bench", num_classes=10, image_size=63, resize=63, dropout=0.0, batch_size=4, towers=1,
                     train_data="unused", val_data="unused", seed=0, channels_last=False)
worker = TowerWorker(config, rank=0)
worker.optimizer.state_dict()
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))  # since exec
print("torch._dynamo" in sys.modules, peak_kb)
"""

LOADER_CHILD = """
import re
import sys
if sys.argv[1] == "baseline":
    import torch  # what every loader actor imported before
from cluster.rank.loader import LoaderWorker
from data.loader import ShardBatches
train_pattern, val_pattern = sys.argv[2:4]
readers = {"train": ShardBatches(train_pattern, 8, train=True, seed=0, resize=72, crop=64, num_classes=10),
           "val": ShardBatches(val_pattern, 8, train=False, seed=0, resize=72, crop=64, num_classes=10)}
loader = LoaderWorker(readers, replica=0, loader=0, loaders=1)
loader.load("train", 0, 0)
loader.load("val", 0, 0)
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print("torch" in sys.modules, peak_kb)
"""


def sample(child: str, kind: str, *args: str) -> tuple[float, bool, float]:
    """CPU seconds of one fresh process running `child` as `kind`, whether it imported what it
    reports (torch._dynamo, or torch), and its peak resident MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", child, kind, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    imported, peak_kb = proc.stdout.split()[-2:]
    return cpu, imported == "True", int(peak_kb) / 1024


def measure(child: str, samples: int, *args: str) -> dict:
    """Medians of `samples` fresh processes of each kind, alternating."""
    found, peak = {"baseline": [], "ours": []}, {"baseline": [], "ours": []}
    imports = {}
    for _ in range(samples):
        for kind in found:
            cpu, imports[kind], mb = sample(child, kind, *args)
            found[kind].append(cpu)
            peak[kind].append(mb)
    median = {kind: statistics.median(values) for kind, values in found.items()}
    return {"cpu_s": found, "median_cpu_s": median, "ratio": median["ours"] / median["baseline"], "imports": imports,
            "median_peak_mb": {kind: statistics.median(values) for kind, values in peak.items()}}


def report(title: str, result: dict, what: str, samples: int) -> None:
    median = result["median_cpu_s"]
    print(f"{title}, median of {samples}")
    print(f"{'':<9} | {'CPU s':>6} | {'peak MB':>7} | imports {what}")
    for kind in median:
        print(f"{kind:<9} | {median[kind]:6.2f} | {result['median_peak_mb'][kind]:7.0f} | "
              f"{'yes' if result['imports'][kind] else 'no'}")
    print(f"ratio ours / baseline: {result['ratio']:.2f}× ({median['baseline'] - median['ours']:.2f} CPU s less "
          f"per actor)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/actor_start.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=7, help="fresh processes of each kind (7)")
    parser.add_argument("--data", metavar="DIR", help="where the loader's demo dataset is made, or found "
                        "(default: a temporary folder)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one process of each kind")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if args.quick:
        args.samples = 1
    tower = measure(CHILD, args.samples)
    report("a fresh process becoming a tower actor (import, TowerWorker, optimizer state dict)", tower,
           "torch._dynamo", args.samples)
    with tempfile.TemporaryDirectory() as scratch:
        from data.demo import ensure_demo_dataset

        demo = ensure_demo_dataset(args.data or scratch, train_per_class=6, val_per_class=2)
        loader = measure(LOADER_CHILD, args.samples, demo.train_pattern, demo.val_pattern)
    print()
    report("a fresh process becoming a loader actor (import, LoaderWorker, a training and a validation batch)",
           loader, "torch", args.samples)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu_s": tower["cpu_s"], "median_cpu_s": tower["median_cpu_s"],
                       "ratio": tower["ratio"], "imports_dynamo": tower["imports"],
                       "median_peak_mb": tower["median_peak_mb"],
                       "loader": {"cpu_s": loader["cpu_s"], "median_cpu_s": loader["median_cpu_s"],
                                  "ratio": loader["ratio"], "imports_torch": loader["imports"],
                                  "median_peak_mb": loader["median_peak_mb"]}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
