"""Tower-parallel benchmark: two 1-thread actors exchanging through gloo vs one 2-thread actor.

What one run measures, all on this machine and in the same run (machines here are noisy, so every
result is a ratio against a baseline measured alongside it):

1. matmul rate: fp32 `torch.mm` of two n×n matrices (`--matmul-size`, 4096) in a Ray actor with
   2 CPUs and `torch.set_num_threads(2)`, i.e. the training actors' environment and allocator;
   GFLOP/s = 2·n³ / median time of `--matmul-reps` timed reps (after 2 warm-up reps).
2. reference: the whole `TwoTowerAlexNet` in ONE actor with 2 threads — the project's own
   `TowerWorker` with towers=1, which holds both towers and exchanges locally.
3. two-actor: `TowerWorker` with towers=2, one thread each, exchanging activations through gloo.
   Both configurations run `train_step` (input normalisation, `PaperSGD`, cross-entropy, dropout
   0.5) on the same fixed random uint8 batch: `--warmup` untimed steps, then `--steps` timed
   ones. img/s = batch / MEDIAN driver wall time of a timed `workers.train_step(...)`.
   exchange share (two-actor) = Σ exchange_seconds / Σ seconds over the timed steps of both
   ranks, as the workers report them.
4. training FLOPs: forward FLOPs of one image through the reference network, counted with
   `torch.utils.flop_counter.FlopCounterMode` at the benchmark's image size (224: ≈ 1.45 GFLOP,
   0.72 GMAC), × 3 for forward + backward. train GFLOP/s = img/s × that, shown as % of (1).
5. allocator: glibc malloc (`system`) and/or jemalloc, put into the actors with
   `LD_PRELOAD=libjemalloc.so.2` in their runtime_env; each actor's /proc/self/maps is checked to
   show which allocator it really runs. Install it with `apt-get install libjemalloc2`.

Targets (from the issue): ratio two-actor / reference (same allocator) ≥ 1.0, and training
GFLOP/s ≥ 40% of the matmul rate.

Run from the repository root, alone on the machine (a full-size run takes minutes):

    .venv/bin/python bench/tower_parallel.py [--batch-size 128] [--image-size 224] [--steps 3]
        [--warmup 1] [--allocator {system,jemalloc,both}] [--no-channels-last] [--json PATH]

`--quick` is a smoke run of every part (the suite runs it; its numbers mean nothing).
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cluster.launch import localnet  # noqa: E402
from cluster.launch.actor_mesh import ActorMesh  # noqa: E402
from cluster.launch.session import ray_session  # noqa: E402
from cluster.config import TrainConfig  # noqa: E402
from data.transforms import normalize_batch  # noqa: E402
from stages.loss import cross_entropy_reference  # noqa: E402
from stages.reference import TwoTowerAlexNet  # noqa: E402

CORES = 2  # the benchmark's CPU budget: never more busy processes than this
MATMUL_WARMUP = 2
JEMALLOC_SONAME = "libjemalloc.so.2"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")
INSTALL_HINT = "apt-get install libjemalloc2"


@dataclass(frozen=True)
class Layout:
    name: str
    towers: int
    threads_per_worker: int


LAYOUTS = (Layout("reference", towers=1, threads_per_worker=CORES),
           Layout("two-actor", towers=2, threads_per_worker=CORES // 2))


# --- allocator


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2 from the linker cache, else from the usual places; None if absent."""
    try:
        cache = subprocess.run(["ldconfig", "-p"], check=False, capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    for line in cache.splitlines():
        if line.strip().startswith(JEMALLOC_SONAME) and "=>" in line:
            path = line.split("=>", 1)[1].strip()
            if os.path.exists(path):
                return path
    return next((path for path in JEMALLOC_PATHS if os.path.exists(path)), None)


def actor_env_vars(allocator: str, jemalloc: str | None) -> dict[str, str]:
    """What every actor of one allocator gets: the driver's loopback settings and the preload
    (empty for `system`, so nothing preloaded in the driver's environment leaks in)."""
    return {**localnet.loopback_env(), "LD_PRELOAD": jemalloc if allocator == "jemalloc" else ""}


def process_environment(_actor=None) -> dict:
    """Runs inside an actor (also through `__ray_call__`): the allocator it really has mapped and
    its thread settings."""
    with open("/proc/self/maps") as maps:
        jemalloc_mapped = any("jemalloc" in line for line in maps)
    return {"pid": os.getpid(), "allocator": "jemalloc" if jemalloc_mapped else "system",
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "LD_PRELOAD": os.environ.get("LD_PRELOAD", "")}


def check_allocator(environments: list[dict], allocator: str, where: str) -> bool:
    ok = all(env["allocator"] == allocator for env in environments)
    if not ok:
        found = ", ".join(env["allocator"] for env in environments)
        print(f"WARNING: {where}: asked for {allocator}, actors run {found}", flush=True)
    return ok


# --- 1. matmul rate


@ray.remote(num_cpus=CORES)
class MatmulProbe:
    def __init__(self):
        torch.set_num_threads(CORES)

    def environment(self) -> dict:
        return process_environment()

    def seconds(self, n: int, warmup: int, reps: int) -> list[float]:
        """Wall time of each timed fp32 n×n `torch.mm`."""
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for rep in range(warmup + reps):
            start = time.perf_counter()
            torch.mm(a, b)
            if rep >= warmup:
                times.append(time.perf_counter() - start)
        return times


def measure_matmul(env_vars: dict, allocator: str, n: int, reps: int) -> dict:
    probe = MatmulProbe.options(runtime_env={"env_vars": env_vars}).remote()
    try:
        env = ray.get(probe.environment.remote())
        times = ray.get(probe.seconds.remote(n, MATMUL_WARMUP, reps))
    finally:
        ray.kill(probe)
    return {"n": n, "seconds": times, "gflops": 2 * n ** 3 / statistics.median(times) / 1e9,
            "environment": env, "allocator_verified": check_allocator([env], allocator, "matmul actor")}


# --- 4. training FLOPs


def fixed_batch(config: TrainConfig, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's random uint8 images and labels, the same on every call."""
    g = torch.Generator().manual_seed(config.seed)
    batch = config.batch_size if batch is None else batch
    size = config.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, config.num_classes, (batch,), generator=g)


def count_flops(config: TrainConfig) -> dict:
    """FLOPs of one image through the reference network: forward counted, training = 3 × forward
    (the figure every percentage uses), and the backward as counted, for comparison."""
    net = TwoTowerAlexNet(config.model_config, seed=config.seed)
    images, labels = fixed_batch(config, batch=1)
    with FlopCounterMode(display=False) as forward:
        loss = cross_entropy_reference(net(normalize_batch(images)), labels)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    fwd = forward.get_total_flops()
    return {"forward": fwd, "train": 3 * fwd, "backward_counted": backward.get_total_flops()}


# --- 2 and 3. training steps


def train_config(args: argparse.Namespace, layout: Layout) -> TrainConfig:
    return TrainConfig(recipe="bench", towers=layout.towers, threads_per_worker=layout.threads_per_worker,
                       num_classes=1000, image_size=args.image_size, resize=args.image_size,
                       batch_size=args.batch_size, microbatches=1, seed=0,
                       channels_last=args.channels_last, train_data="unused", val_data="unused")


def timed_steps(workers: ActorMesh, config: TrainConfig, warmup: int, steps: int) -> tuple[list, list]:
    """Driver wall time of each timed `train_step` and the workers' own reports of it."""
    images, labels = (workers.put(t) for t in fixed_batch(config))
    walls, reports = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        results = workers.train_step(images, labels, config.lr)
        if step >= warmup:
            walls.append(time.perf_counter() - start)
            reports.append(results)
    return walls, reports


def run_layout(args: argparse.Namespace, layout: Layout, env_vars: dict, allocator: str) -> dict:
    config = train_config(args, layout)
    workers = ActorMesh(config, env_vars)
    try:
        envs = ray.get([actor.__ray_call__.remote(process_environment) for actor in workers.actors])
        walls, reports = timed_steps(workers, config, args.warmup, args.steps)
    finally:
        workers.shutdown()
    seconds = sum(r.seconds for step in reports for r in step)
    exchange = sum(r.exchange_s for step in reports for r in step)
    return {"config": layout.name, "allocator": allocator, "towers": layout.towers,
            "threads_per_worker": layout.threads_per_worker, "step_seconds": walls,
            "images_per_second": config.batch_size / statistics.median(walls),
            "images_per_second_mean": config.batch_size / statistics.mean(walls),
            "exchange_share": exchange / seconds if layout.towers > 1 else None,
            "worker_reports": [[dataclasses.asdict(r) for r in step] for step in reports], "environments": envs,
            "allocator_verified": check_allocator(envs, allocator, f"{layout.name} actors")}


def benchmark_allocator(args: argparse.Namespace, allocator: str, jemalloc: str | None, flops: dict) -> dict:
    """Matmul rate, then each layout, one at a time, all with `allocator`."""
    env_vars = actor_env_vars(allocator, jemalloc)
    matmul = measure_matmul(env_vars, allocator, args.matmul_size, args.matmul_reps)
    print(f"[{allocator}] matmul {matmul['n']}² fp32, {CORES} threads: {matmul['gflops']:.1f} GFLOP/s", flush=True)
    runs = []
    for layout in LAYOUTS:
        run = run_layout(args, layout, env_vars, allocator)
        run["train_gflops"] = run["images_per_second"] * flops["train"] / 1e9
        run["percent_of_matmul"] = 100 * run["train_gflops"] / matmul["gflops"]
        print(f"[{allocator}] {layout.name}: {run['images_per_second']:.2f} img/s", flush=True)
        runs.append(run)
    reference, two_actor = (run["images_per_second"] for run in runs)
    return {"allocator": allocator, "matmul": matmul, "runs": runs, "ratio": two_actor / reference}


# --- report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/tower_parallel.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step (128)")
    parser.add_argument("--image-size", type=int, default=224, help="input side, also the resize (224)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per configuration (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first (1)")
    parser.add_argument("--allocator", choices=("system", "jemalloc", "both"), default=None,
                        help="malloc of the actors (default: both if libjemalloc is installed, else system)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="convolutions in channels_last memory format (default: on)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the matmul's matrices (4096)")
    parser.add_argument("--matmul-reps", type=int, default=5, help=f"timed matmuls after {MATMUL_WARMUP} warm-up (5)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run for the test suite: batch 8 at 64×64, "
                                                              "1 timed step, a 512² matmul, system malloc")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.steps, args.warmup = 8, 64, 1, 1
        args.matmul_size, args.matmul_reps, args.allocator = 512, 1, args.allocator or "system"
    for name in ("batch_size", "steps", "matmul_size", "matmul_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def allocators(requested: str | None, jemalloc: str | None) -> list[str]:
    """The allocators to run; jemalloc is skipped (with the install hint) when it is missing."""
    requested = requested or ("both" if jemalloc else "system")
    wanted = ["system", "jemalloc"] if requested == "both" else [requested]
    if "jemalloc" in wanted and jemalloc is None:
        print(f"jemalloc: {JEMALLOC_SONAME} not found ({INSTALL_HINT}); skipping it", flush=True)
        wanted.remove("jemalloc")
    return wanted


def print_report(args: argparse.Namespace, flops: dict, results: list[dict], load: tuple[float, float]) -> None:
    print()
    print(f"torch {torch.__version__}, ray {ray.__version__}; batch {args.batch_size}, "
          f"{args.image_size}×{args.image_size}, channels_last {args.channels_last}, "
          f"{args.warmup} warm-up + {args.steps} timed steps (img/s from the median step)")
    first = results[0]
    threads = [("matmul", [first["matmul"]["environment"]])]
    threads += [(run["config"], run["environments"]) for run in first["runs"]]
    print("torch threads per actor (as the actors report them): "
          + ", ".join(f"{name} {'+'.join(str(e['torch_threads']) for e in envs)}" for name, envs in threads)
          + f"; Ray num_cpus {CORES}")
    print("load average (1 min) before / after: {:.2f} / {:.2f}".format(*load))
    print(f"FLOPs/image: forward {flops['forward'] / 1e9:.3f} G (counted), training "
          f"{flops['train'] / 1e9:.3f} G (3 × forward; backward as counted {flops['backward_counted'] / 1e9:.3f} G)")
    for result in results:
        m = result["matmul"]
        print(f"matmul [{result['allocator']}{'' if m['allocator_verified'] else '!'}]: {m['gflops']:.1f} GFLOP/s "
              f"(fp32 {m['n']}², median of {len(m['seconds'])})")
    header = (f"{'config':<10} | {'allocator':<9} | {'img/s':>7} | {'train GFLOP/s':>13} | "
              f"{'% of matmul':>11} | exchange share")
    print(header)
    print("-" * len(header))
    for result in results:
        for run in result["runs"]:
            share = "-" if run["exchange_share"] is None else f"{100 * run['exchange_share']:.1f}%"
            allocator = run["allocator"] + ("" if run["allocator_verified"] else "!")
            print(f"{run['config']:<10} | {allocator:<9} | {run['images_per_second']:>7.2f} | "
                  f"{run['train_gflops']:>13.1f} | {run['percent_of_matmul']:>10.1f}% | {share}")
    for result in results:
        print(f"ratio two-actor / reference (same allocator, {result['allocator']}): {result['ratio']:.2f}"
              "   (target >= 1.0)")
    print("target: train GFLOP/s >= 40% of matmul")
    if not all(x["allocator_verified"] for result in results for x in [result["matmul"], *result["runs"]]):
        print("'!': the actors did not run the allocator asked for (see the warnings above)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jemalloc = find_jemalloc()
    wanted = allocators(args.allocator, jemalloc)
    if not wanted:
        print("error: no allocator left to benchmark", file=sys.stderr)
        return 2
    flops = count_flops(train_config(args, LAYOUTS[0]))
    load_before = os.getloadavg()[0]
    with ray_session(cpus_wanted=CORES, dashboard=False):  # or the Ray this process has; on 127.0.0.1
        results = [benchmark_allocator(args, allocator, jemalloc, flops) for allocator in wanted]
    load = (load_before, os.getloadavg()[0])  # a busy machine skews the 2-thread runs most
    print_report(args, flops, results, load)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "ray": ray.__version__,
                       "cores": CORES, "load_average": load, "jemalloc": jemalloc, "flops_per_image": flops,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
