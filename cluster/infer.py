"""`python -m cluster.infer MODEL --data PATTERN --out DIR [--batch-size N] [--concurrency N]
[--gpus-per-worker G]`: label every image of a set of WebDataset shards with Ray Data.

MODEL is an export (OUT.pt with its OUT.json), a run dir or a checkpoint dir. Each shard's
predictions go to DIR/<shard>.parquet (key, label, top-k classes and probabilities, error),
written atomically; running the same command again skips the shards already done, so a stopped
or failed run goes on where it was. Bad samples (an image that does not decode, a corrupt tar)
are rows with an `error` and are listed in DIR/_summary.json; they never stop the run.
cluster/serve/inference.py describes the pipeline.

Exit status: 0 done (bad samples included), 1 the pipeline failed (re-run to go on), 2 bad input
(a missing or unusable MODEL, no shards, an OUT holding another model's predictions).
"""

import argparse
import logging
import os
import sys

from cluster import faults
from cluster.argtypes import nonnegative, positive
from cluster.ckpt import storage
from cluster.config import DEMO_DATA
from cluster.serve.inference import (InferOptions, OutputConflict, Settings, Summary, output_path, pending_shards,
                                     run_inference, write_summary)
from cluster.serve.model import ModelError, load_model
from cluster.telemetry.progress import ProgressBar
from data.shards import expand_shards




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.infer",
        description="Batch inference of a trained two-tower AlexNet over WebDataset shards with Ray Data: one "
                    "Parquet file of predictions per shard.")
    parser.add_argument("model", help="an export .pt (with its .json), a run dir or a checkpoint dir")
    parser.add_argument("--data", required=True, help="the shards: a brace pattern, a glob, a directory, or `demo` "
                                                      "(the demo's validation shards)")
    parser.add_argument("--out", required=True, help="directory of the predictions (a path or a URI)")
    parser.add_argument("--batch-size", type=positive, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--concurrency", type=positive,
                        help="inference actors (default: GPUs / --gpus-per-worker on a GPU cluster; on CPUs, "
                             "half the cluster's CPUs / --threads-per-worker, or one per core on a local Ray; never "
                             "more than the shards)")
    parser.add_argument("--gpus-per-worker", type=nonnegative,
                        help="GPUs of each inference actor (default: 1 when the cluster has GPUs, else 0: CPUs)")
    parser.add_argument("--threads-per-worker", type=positive, default=1,
                        help="torch threads (and Ray CPUs) of each CPU inference actor (default: 1)")
    parser.add_argument("--views", type=int, choices=(1, 10), default=1,
                        help="1: the centre crop (default); 10: the paper's ten views, softmax averaged")
    parser.add_argument("--topk", type=positive, default=5, help="classes kept per image, best first (default: 5)")
    parser.add_argument("--address", default="", help="Ray cluster to join (default: $RAY_ADDRESS, else a new "
                                                      "local one on 127.0.0.1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        model = load_model(args.model)
        args.topk = min(args.topk, model.cfg.num_classes)
        paths = shards(args.data)
        storage.open_storage(args.out).makedirs()
        todo, done = pending_shards(paths, args.out, Settings(model.fingerprint, args.views, args.topk))
    except (ModelError, OutputConflict, ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for note in model.notes:
        print(f"note: {note}", flush=True)
    if not todo:
        print(f"all {len(paths)} shard(s) have complete predictions in {args.out}: nothing to do")
        return 0
    print(f"predicting {len(todo)} shard(s) with {model.describe()} into {args.out}"
          + (f" ({len(done)} already complete, skipped)" if done else ""), flush=True)
    from cluster.launch.failures import failure_cause  # Ray: not for bad input
    from cluster.launch.session import ray_session

    import ray

    summary = Summary(shards=len(paths), skipped=len(done))
    local = not (args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())  # a Ray of our own
    cores = os.cpu_count() or 1
    actor_cpus = args.concurrency * args.threads_per_worker if args.concurrency else cores
    try:  # a local Ray gets a CPU for the read tasks beside the actors' (the cores are shared)
        with ray_session(args.address, actor_cpus + 1 if local else 1) as env:
            options = resolve_options(args, len(todo), cores if local else None)
            print(f"{options.concurrency} inference actor(s) of "
                  + (f"{options.gpus_per_worker:g} GPU(s)" if options.gpus_per_worker else
                     f"{options.threads_per_worker} CPU thread(s)") + f", batches of {options.batch_size}", flush=True)
            bar = ProgressBar("infer", len(todo), "shards")
            rate = lambda: summary.rows / max(bar.clock() - bar.started, 1e-9)  # noqa: E731
            run_inference(model, todo, args.out, options, summary, {**env, **faults.forwarded()},
                          on_shard=lambda shard: bar.update(summary.written, f"{summary.rows} images, {rate():.1f} img/s"))
            bar.close()
    except (ray.exceptions.RayError, RuntimeError) as err:
        cause = failure_cause(err) if isinstance(err, ray.exceptions.RayError) else str(err)
        print(f"error: inference failed after {summary.written} of {len(todo)} shard(s): {cause}; run the same "
              f"command again to go on", file=sys.stderr)
        return 1
    print(report(summary, write_summary(args.out, summary, model, options)))
    return 0


def shards(pattern: str) -> list[str]:
    """--data's shards (`demo`: the demo's validation shards); ValueError when two share a name
    (their predictions would share a file)."""
    if pattern == DEMO_DATA:
        from data.demo import ensure_demo_dataset

        pattern = ensure_demo_dataset().val_pattern
    paths = expand_shards(pattern)
    names = {}
    for path in paths:
        other = names.setdefault(output_path("", path), path)
        if other != path:
            raise ValueError(f"data: {other} and {path} have the same name, so their predictions would share a file: "
                             f"run them into separate --out directories")
    return paths


def resolve_options(args: argparse.Namespace, shards: int, local_cores: int | None) -> InferOptions:
    """The defaults that depend on the cluster (GPUs when it has them; on a local Ray of this
    machine's `local_cores`, one single-threaded actor per core) and on the work (no more actors
    than shards)."""
    import ray

    resources = ray.cluster_resources()
    gpus_per_worker = args.gpus_per_worker if args.gpus_per_worker is not None else (
        1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    if args.concurrency:
        concurrency = args.concurrency
    elif gpus_per_worker > 0:
        concurrency = max(1, min(int(resources.get("GPU", 0) // gpus_per_worker), shards))
    else:
        cpus = local_cores or int(resources.get("CPU", 1)) // 2  # elsewhere: half the CPUs read and decode
        concurrency = max(1, min(cpus // args.threads_per_worker, shards))
    return InferOptions(args.batch_size, concurrency, gpus_per_worker, args.threads_per_worker, args.views, args.topk)


def report(summary: Summary, summary_path: str) -> str:
    bad = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.bad_by_reason.items())) or "none"
    lines = [f"done: {summary.rows} images in {summary.written} shard(s) ({summary.skipped} skipped: complete), "
             f"{summary.rows / max(summary.seconds, 1e-9):.1f} img/s, by {len(summary.actors)} actor(s) on "
             f"{len(summary.nodes)} node(s); bad samples: {bad}"]
    lines += [f"  bad: {entry['shard']} {entry['key']}: {entry['reason']}" for entry in summary.bad[:10]]
    lines += [f"  broken: {entry['shard']}: {entry['reason']}" for entry in summary.broken[:10]]
    lines.append(f"summary: {summary_path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
