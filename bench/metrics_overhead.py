"""Monitoring overhead: training images/s with and without the run's metrics, in one run.

One process resolves the driver's configuration (the `demo` recipe unless driver flags say
otherwise), starts Ray and one actor mesh, and then trains `--rounds` pairs of short runs of
`--steps` steps each, alternating the order within each pair:

    off   `train(..., metrics=Metrics())`: the base class, which does nothing;
    on    `train(..., metrics=RunMetrics(...))`: the Prometheus exporter on a free loopback port,
          scraped every second by a thread (as a Prometheus with a 1 s interval would), the
          history file, the epoch and run tables (printed to nowhere).

Every run starts from fresh weights (each actor's `reset`) and the start of the data, in a run
dir of its own. Throughput is the loop's: images of steps 2..N over the time from the first
step's results to the last's (when each `train_step` returns), so the metrics hooks between
steps are inside it, and evaluation and the final checkpoint are outside. Prints each run, the
median of each mode and on/off (the issue's target: a cost under 1%). Run from the repository
root, alone on the machine:

    .venv/bin/python bench/metrics_overhead.py [--steps 40] [--rounds 3] [--json PATH] [DRIVER FLAGS...]

`--quick` is a smoke run (the suite runs it on tiny data).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.launch.actor_mesh import ActorMesh  # noqa: E402
from cluster.driver import open_data, parse_args, ray_session, resolve_config  # noqa: E402
from cluster.telemetry.metrics import Metrics, RunMetrics  # noqa: E402
from cluster.trainer import Start, total_steps, train  # noqa: E402


class TimedMesh:
    """The actor mesh, noting when each train_step's results arrive."""

    def __init__(self, mesh: ActorMesh):
        self.mesh, self.returned = mesh, []

    def train_step(self, *args, **kwargs):
        results = self.mesh.train_step(*args, **kwargs)
        self.returned.append(time.perf_counter())
        return results

    def __getattr__(self, name):
        return getattr(self.mesh, name)


def scrape_every_second(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=5) as answer:
            answer.read()


def one_run(config, mesh: ActorMesh, train_data, val_data, monitored: bool) -> float:
    """Train config.max_steps steps from fresh weights; the loop's images/s over steps 2..N."""
    mesh.reset(config.seed)
    timed = TimedMesh(mesh)
    stop = threading.Event()
    metrics = Metrics()
    if monitored:
        metrics = RunMetrics(config, train_data, val_data, total_steps(config, train_data), print_fn=lambda line: None)
        threading.Thread(target=scrape_every_second, args=(metrics.url, stop), daemon=True).start()
    try:
        metrics.begin(0, 0)
        train(config, timed, train_data, val_data, print_fn=lambda line: None, start=Start(), metrics=metrics)
    finally:
        stop.set()
        metrics.close()
    steps = len(timed.returned)
    return (steps - 1) * config.global_batch / (timed.returned[-1] - timed.returned[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps of each run")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (off and on, order alternating)")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument("--quick", action="store_true", help="a smoke run for the test suite: one round of 3 steps "
                                                              "(give small data with the driver flags)")
    args, driver_flags = parser.parse_known_args(argv)
    if args.quick:
        args.steps, args.rounds = 3, 1
    root = tempfile.mkdtemp(prefix="bench-metrics-", dir=os.getcwd())
    base = resolve_config(parse_args(driver_flags)).replace(max_steps=args.steps, metrics_addr="127.0.0.1:0",
                                                            report=False, keep_checkpoints=1,
                                                            run_dir=os.path.join(root, "run"))
    train_data, val_data = open_data(base)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    print(f"{args.rounds} round(s) of {args.steps} steps, {base.global_batch} images a step, {base.mesh.describe()}",
          flush=True)
    try:
        with ray_session(base.address, base.cpus_wanted) as env:
            mesh = ActorMesh(base, env, readers={"train": train_data.reader, "val": val_data.reader})
            try:
                for i in range(args.rounds):
                    order = ("off", "on") if i % 2 == 0 else ("on", "off")
                    for mode in order:
                        config = base.replace(run_dir=os.path.join(root, f"run-{i}-{mode}"))
                        rates[mode].append(one_run(config, mesh, train_data, val_data, mode == "on"))
                        shutil.rmtree(config.run_dir, ignore_errors=True)
                    print(f"round {i + 1}: off {rates['off'][-1]:.2f} img/s | on {rates['on'][-1]:.2f} img/s",
                          flush=True)
            finally:
                mesh.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"median: off {off:.2f} img/s, on {on:.2f} img/s; on/off {on / off:.4f} "
          f"(monitoring costs {100 * (1 - on / off):.2f}% of throughput)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "rounds": args.rounds, "images_per_step": base.global_batch,
                       "mesh": base.mesh.describe(), "off": rates["off"], "on": rates["on"],
                       "ratio": on / off}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
