"""`python -m cluster.evaluate SOURCE [--val-data PATTERN] [--eval-views 1|10] [--replicas R] [--local]
[--json OUT]`: a trained network's top-1/top-5 error on a validation set.

SOURCE is a run dir (its newest complete checkpoint that verifies), a checkpoint dir or an export
(OUT.pt with its OUT.json). By default it runs on the Ray mesh: tower actors of the shape the
checkpoint was trained with (`--replicas`, `--stages`, `--towers` change it; any shape loads the
network, as a resume re-splits it) fed by loader actors; `--local` runs in this process without
Ray (the reference network, the same reader and transforms). It prints a progress bar, then the
errors next to the run's own figure at training time (its history) and the paper's table (§6),
and with `--json` writes them (cluster/serve/evaluation.py says what agrees with what, and how
exactly).

Exit status: 0 done, 1 the evaluation failed (an actor, a loader, too many bad samples), 2 bad
input (a missing or unusable SOURCE, bad shards or options).
"""

import argparse
import json
import logging
import os
import sys
import time

from cluster.argtypes import positive
from cluster.config import DEMO_DATA, ConfigError
from cluster.serve.evaluation import (EvaluationFailed, comparison, evaluate_in_process, evaluate_on_mesh,
                                      evaluation_config, open_validation, result_json, same_data, training_figure,
                                      views_name)
from cluster.serve.model import ModelError, load_model
from cluster.telemetry.progress import ProgressBar
from data.loader import DataError



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.evaluate",
        description="Top-1/top-5 error of a trained two-tower AlexNet on validation shards, on the Ray mesh or "
                    "in one process, next to the run's own figure and the paper's.")
    parser.add_argument("source", help="a run dir, a checkpoint-NNNNNNNN dir (paths or URIs) or an export .pt "
                                       "(with its .json)")
    parser.add_argument("--val-data", help="validation shards: a brace pattern, a glob, a directory or `demo` "
                                           "(default: the run's own --val-data, an export's too while its run is there)")
    parser.add_argument("--eval-views", type=int, choices=(1, 10),
                        help="1: the centre crop; 10: the paper's ten views, softmax averaged (default: the run's)")
    parser.add_argument("--local", action="store_true",
                        help="run in this process, without Ray: the reference network (both towers), one process")
    for flag, what in (("--replicas", "data-parallel replicas, each scoring its share"),
                       ("--stages", "pipeline stages per tower"), ("--towers", "tower processes (1 or 2)"),
                       ("--batch-size", "images per batch and replica"),
                       ("--loader-threads", "threads decoding each batch")):
        parser.add_argument(flag, type=positive, help=f"{what} (default: as the run trained)")
    parser.add_argument("--threads", type=positive,
                        help="torch threads: of each tower actor (default: as the run trained), or of this process "
                             f"with --local (default: every core, {os.cpu_count()})")
    parser.add_argument("--address", default="", help="Ray cluster to join (default: $RAY_ADDRESS, else a new "
                                                      "local one on 127.0.0.1)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        model = load_model(args.source)
        config = evaluation_config(
            model, validation_data(args.val_data, model), args.eval_views, local=args.local,
            replicas=args.replicas, stages=args.stages, towers=args.towers, batch_size=args.batch_size,
            loader_threads=args.loader_threads, address=args.address or None,
            threads_per_worker=args.threads or (os.cpu_count() if args.local else None))
        val_data = open_validation(config)
    except (ModelError, ConfigError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for note in model.notes:
        print(f"note: {note}", flush=True)
    where = "one process (the reference network)" if args.local else f"the mesh, {config.mesh.describe()}"
    print(f"evaluating {model.describe()} on {val_data.reader.num_samples} images of {config.val_data} "
          f"({views_name(config.eval_views)}, {config.resize}->{config.image_size}) in {where}", flush=True)
    bar = ProgressBar("evaluate", val_data.batches_per_epoch, "batches")

    def on_batch(done: int, total) -> None:
        images = max(total.images, 1)
        bar.update(done, f"{total.images:.0f} images, top-1 error {100 * (1 - total.top1 / images):.1f}%")

    started = time.perf_counter()
    try:
        if args.local:
            result, mesh = evaluate_in_process(config, model, val_data.reader, on_batch), "local"
        else:
            result, mesh = evaluate_on_mesh(config, model, val_data, on_batch,
                                            print_fn=lambda line: print(line, flush=True))
    except (EvaluationFailed, DataError) as err:
        print(f"error: evaluation failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    bar.close()
    training = training_figure(model)
    print(comparison(result, config.eval_views, training, model))
    bad = ", ".join(f"{n} {reason}" for reason, n in sorted(result.bad.items())) or "none"
    print(f"loss {result.loss:.4f} over {result.images} images in {seconds:.1f} s; bad samples: {bad}")
    if training is not None and not (same_data(training["val_data"], config.val_data)
                                     and training["views"] == config.eval_views):
        print("note: the run's figure is of other validation data or views than this evaluation's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result_json(result, config, model, "local" if args.local else "mesh", mesh, training, seconds),
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0


def validation_data(given: str | None, model) -> str:
    """--val-data, or the run's own; `demo` becomes the demo's validation shards."""
    pattern = given or (model.training or {}).get("val_data")
    if not pattern:
        raise ConfigError("--val-data is required for an export (it does not record its run's data): "
                          "give the validation shards")
    if pattern == DEMO_DATA:
        from data.demo import ensure_demo_dataset

        pattern = ensure_demo_dataset().val_pattern
    return pattern


if __name__ == "__main__":
    sys.exit(main())
