"""Actor start benchmark: the CPU seconds a fresh process spends becoming a tower actor, ours against
torch's optimizer methods as torch ships them, in one run.

Each sample is a fresh interpreter (as Ray starts one per actor) that imports the tower actor's
module, builds a `TowerWorker` (both towers in one process, the tests' 63×63 network with the
paper's fc widths) and takes its optimizer's state dict, as a checkpoint does. Its CPU time is
the child's user + system time (`getrusage(RUSAGE_CHILDREN)`), start to exit.

- **baseline**: `PaperSGD` with `torch.optim.Optimizer`'s methods as torch ships them, each wrapped
  in `torch._disable_dynamo`, whose first call imports torch._dynamo (what the code did before).
- **ours**: `PaperSGD` as it is (stages/optim.py uses those methods as written: nothing imports
  torch._dynamo).

The samples alternate baseline/ours; the figures are medians. The ratio is ours / baseline (lower
is better). Run alone on the machine:

    .venv/bin/python bench/actor_start.py [--samples 7] [--json PATH]

`--quick` is a smoke run (the suite runs it; its numbers mean nothing).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
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
print("torch._dynamo" in sys.modules)
"""


def sample(kind: str) -> tuple[float, bool]:
    """CPU seconds of one fresh process becoming a tower actor, and whether it imported torch._dynamo."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", CHILD, kind], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, proc.stdout.split()[-1] == "True"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/actor_start.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=7, help="fresh processes of each kind (7)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one process of each kind")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if args.quick:
        args.samples = 1
    found = {"baseline": [], "ours": []}
    dynamo = {}
    for _ in range(args.samples):
        for kind in found:
            cpu, dynamo[kind] = sample(kind)
            found[kind].append(cpu)
    median = {kind: statistics.median(values) for kind, values in found.items()}
    ratio = median["ours"] / median["baseline"]
    print(f"a fresh process becoming a tower actor (import, TowerWorker, optimizer state dict), "
          f"median of {args.samples}")
    print(f"{'':<9} | {'CPU s':>6} | imports torch._dynamo")
    for kind in found:
        print(f"{kind:<9} | {median[kind]:6.2f} | {'yes' if dynamo[kind] else 'no'}")
    print(f"ratio ours / baseline: {ratio:.2f}× ({median['baseline'] - median['ours']:.2f} CPU s less per actor)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu_s": found, "median_cpu_s": median, "ratio": ratio,
                       "imports_dynamo": dynamo}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
