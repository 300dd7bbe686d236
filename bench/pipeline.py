"""Pipeline benchmark: S = 2 stages, both towers in each actor (towers = 1), two Ray actors of one
thread each — the configuration that fits this 2-core machine — against the single-process
reference network on two threads, in one run.

For each schedule (1F1B, GPipe) and M microbatches (1, 2, 4, 8 by default) it runs `--warmup`
untimed and `--steps` timed training steps of one `--batch-size` batch of random images through
real actors (activations and gradients cross between the stages by gloo send/recv on loopback)
and prints, per M:

    theory    the ideal bubble (S − 1) / (M + S − 1) of equal stages;
    measured  the mean over actors of each actor's idle share of the step (from the actors' own
              timelines: time not spent in a forward or backward between the first actor's
              start and the last actor's flush; cluster/telemetry/timeline.py), averaged over the steps;
    expected  the bubble the measured per-stage forward and backward times predict for that
              schedule with free links (cluster/plan/schedule.py `expected_bubble`): between it and
              `theory` is stage imbalance, between it and `measured` transfer and scheduling
              overhead;
    img/s     training images per second of the pipeline and of the reference (full batch, two
              intra-op threads, same step: forward, backward, the paper's SGD update), and their
              ratio;
    peak      the largest activation memory one stage held (autograd's saved tensors, measured
              by the actor) and the most microbatches it held at once.

The split is balanced by measured layer times (stages/split.py `layer_times`, one thread, at the
M = max microbatch size) unless `--split` gives one. Run from the repository root, alone on the
machine (about 5 minutes at the defaults on this 2-core VM):

    .venv/bin/python bench/pipeline.py [--batch-size 128] [--image-size 224] [--microbatches 1 2 4 8]
        [--steps 3] [--warmup 1] [--schedules 1f1b gpipe] [--split "conv1-conv3 | conv4-fc8"] [--json PATH]
        [--trace-dir DIR]

`--quick` is a smoke run of every part (the suite runs it; its numbers mean nothing).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.launch.actor_mesh import ActorMesh  # noqa: E402
from cluster.launch.session import ray_session  # noqa: E402
from cluster.config import TrainConfig  # noqa: E402
from cluster.plan.schedule import expected_bubble, ideal_bubble  # noqa: E402
from cluster.telemetry.timeline import step_summary, write_trace  # noqa: E402
from data.transforms import normalize_batch  # noqa: E402
from stages.loss import cross_entropy_reference  # noqa: E402
from stages.optim import PaperSGD  # noqa: E402
from stages.reference import TwoTowerAlexNet  # noqa: E402
from stages.split import balanced_split, format_split, layer_costs, layer_times, split_table  # noqa: E402

STAGES = 2
TARGET_PP = 5.0  # the target: measured bubble within 5 percentage points of theory at M = 8


def make_batch(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (config.batch_size, 3, config.image_size, config.image_size),
                           dtype=torch.uint8, generator=g)
    return images, torch.randint(0, config.num_classes, (config.batch_size,), generator=g)


class Reference:
    """The single-process reference network, one whole-batch training step per call."""

    def __init__(self, config: TrainConfig, threads: int):
        self.threads = threads
        self.net = TwoTowerAlexNet(config.model_config, seed=config.seed).to(memory_format=torch.channels_last)
        self.optimizer = PaperSGD(self.net.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        x = normalize_batch(images, memory_format=torch.channels_last)
        cross_entropy_reference(self.net(x), labels).backward()
        self.optimizer.step()
        return time.perf_counter() - start


def run_pipeline(workers: ActorMesh, images, labels, schedule: str, m: int, warmup: int, steps: int,
                 trace: str = "") -> dict:
    """Timed steps of one (schedule, M): wall time per step and what the actors' reports say;
    the last step's Chrome trace goes to `trace` when given."""
    seconds, bubbles = [], []
    forward, backward = {0: [], 1: []}, {0: [], 1: []}
    peaks = {}
    for i in range(warmup + steps):
        start = time.perf_counter()
        reports = workers.train_step(images, labels, 0.001, microbatches=m, schedule=schedule)
        elapsed = time.perf_counter() - start
        if i < warmup:
            continue
        seconds.append(elapsed)
        bubbles.append(step_summary(reports).bubble)
        for r in reports:  # one microbatch's forward, backward on this stage
            forward[r.stage].append(sum(e - b for kind, _, b, e in r.events if kind == "F") / m)
            backward[r.stage].append(sum(e - b for kind, _, b, e in r.events if kind == "B") / m)
            peak = peaks.setdefault(r.stage, [0, 0])
            peak[0] = max(peak[0], r.peak_activation_bytes)
            peak[1] = max(peak[1], r.peak_in_flight)
    f = [statistics.median(forward[s]) for s in range(STAGES)]
    b = [statistics.median(backward[s]) for s in range(STAGES)]
    if trace:
        write_trace(trace, reports, workers.mesh, warmup + steps)
    return {
        "step_s": statistics.median(seconds),
        "bubble": statistics.mean(bubbles),
        "expected_bubble": expected_bubble(schedule, f, b, m),
        "stage_forward_s": f,
        "stage_backward_s": b,
        "peak_activation_mib": [peaks[s][0] / 2**20 for s in range(STAGES)],
        "peak_in_flight": [peaks[s][1] for s in range(STAGES)],
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per (schedule, M)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--split", default="", help="stage table; default: balanced by measured layer times")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--trace-dir", default="", help="write each (schedule, M)'s last step as Chrome-trace JSON here")
    parser.add_argument("--quick", action="store_true", help="a smoke run for the test suite: batch 8 at 63×63, "
                                                              "10 classes, M = 2, one timed step")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.num_classes, args.microbatches = 8, 63, 10, [2]
        args.steps, args.warmup = 1, 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base = TrainConfig(recipe="bench", num_classes=args.num_classes, image_size=args.image_size,
                       resize=args.image_size, dropout=0.0, batch_size=args.batch_size, lr=0.001,
                       train_data="unused", val_data="unused", stages=STAGES, towers=1, threads_per_worker=1)
    rows = args.batch_size // max(args.microbatches)
    if args.split:
        split_text = args.split
    else:
        split_text = format_split(balanced_split(layer_times(base.model_config, rows, threads=1), STAGES))
    config = base.replace(stage_split=split_text)
    print(f"torch {torch.__version__}, ray {ray.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; batch {args.batch_size} of {args.image_size}×{args.image_size}, "
          f"{args.num_classes} classes")
    print(f"split (balanced by layer times at {rows} images/microbatch unless given):\n"
          f"{split_table(config.split, layer_costs(config.model_config))}")
    images, labels = make_batch(config)
    results = {"config": {"batch_size": args.batch_size, "image_size": args.image_size, "split": split_text,
                          "stages": STAGES, "towers": 1, "threads_per_actor": 1, "reference_threads": 2},
               "rows": []}
    with ray_session(cpus_wanted=2, dashboard=False, actor_logs=False):  # or the Ray this process has
        workers = ActorMesh.take(config)  # a kept mesh of the same processes, configured afresh
        reference = Reference(config, threads=2)
        for m in args.microbatches:
            reference.step(images, labels)  # warm-up
            ref_s = statistics.median(reference.step(images, labels) for _ in range(args.steps))
            for schedule in args.schedules:
                trace = os.path.join(args.trace_dir, f"{schedule}-M{m}.json") if args.trace_dir else ""
                row = run_pipeline(workers, images, labels, schedule, m, args.warmup, args.steps, trace)
                row.update(schedule=schedule, microbatches=m, theory=ideal_bubble(STAGES, m),
                           reference_step_s=ref_s,
                           pipeline_images_s=args.batch_size / row["step_s"],
                           reference_images_s=args.batch_size / ref_s)
                row["ratio"] = row["pipeline_images_s"] / row["reference_images_s"]
                results["rows"].append(row)
                print(f"  done: {schedule} M={m}", flush=True)
        workers.keep()
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def print_report(results: dict) -> None:
    header = (f"{'schedule':8} | {'M':>2} | {'theory':>6} | {'measured':>8} | {'expected':>8} | "
              f"{'pipeline img/s':>14} | {'reference img/s':>15} | {'ratio':>5} | peak activations per stage")
    print(header)
    print("-" * len(header))
    for r in results["rows"]:
        peaks = ", ".join(f"{mib:.0f} MiB/{n} mb" for mib, n in zip(r["peak_activation_mib"], r["peak_in_flight"]))
        print(f"{r['schedule']:8} | {r['microbatches']:>2} | {100 * r['theory']:5.1f}% | {100 * r['bubble']:7.1f}% | "
              f"{100 * r['expected_bubble']:7.1f}% | {r['pipeline_images_s']:14.2f} | {r['reference_images_s']:15.2f} | "
              f"{r['ratio']:5.2f} | {peaks}")
    for r in results["rows"]:
        if r["microbatches"] == 8:
            gap = 100 * (r["bubble"] - r["theory"])
            verdict = "met" if abs(gap) <= TARGET_PP else "MISSED"
            print(f"{r['schedule']} M=8: measured bubble {100 * r['bubble']:.1f}% vs theory {100 * r['theory']:.1f}%: "
                  f"{gap:+.1f} pp (target within ±{TARGET_PP:g} pp)  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
