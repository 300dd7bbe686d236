"""Entry point: `python cluster/driver.py [--recipe demo] [--flag value ...]`.

Locally it starts its own Ray (every listener on 127.0.0.1); under `ray job submit`, or with
`--address`, it joins that cluster. It validates the whole configuration and the data before any
actor starts, builds the actor mesh, trains, evaluates each epoch and writes a checkpoint.

Exit status: 0 done, 1 the run failed (an actor's error, with its traceback), 2 invalid input.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from cluster import faults  # noqa: E402
from cluster.ckpt import checkpoint, reach, storage  # noqa: E402
from cluster.ckpt.checkpoint import CheckpointError  # noqa: E402
from cluster.ckpt.consolidate import consolidate_with_momentum  # noqa: E402
from cluster.config import DEMO_DATA, ConfigError, TrainConfig, add_arguments, overrides  # noqa: E402
from cluster.launch.actor_mesh import ActorMesh, PlacementError  # noqa: E402
from cluster.launch.loaders import LoaderTimeout  # noqa: E402
from cluster.launch.failures import failure_cause, restart_cause, restartable  # noqa: E402
from cluster.launch.session import RUNS_ENV, durable_root, job_working_copy, ray_session  # noqa: E402
from cluster.recipes import RECIPES, build_config  # noqa: E402
from cluster.inputs import InputPlan, open_reader  # noqa: E402
from cluster.telemetry.metrics import Metrics, RunMetrics  # noqa: E402
from cluster.trainer import (NonFiniteLoss, Start, TrainResult, describe_schedule, resume_point,  # noqa: E402
                             total_steps, train)
from data.demo import ensure_demo_dataset  # noqa: E402
from data.loader import DataError, decoded_in_process  # noqa: E402
from data.shards import expand_shards  # noqa: E402
from stages.config import PAPER_FC_WIDTH, SWITCHES  # noqa: E402
from stages.reference import parameter_count  # noqa: E402
from stages.split import layer_costs, split_table  # noqa: E402

log = logging.getLogger("cluster.driver")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line. `--help` shows each flag's value in the recipe given with it (demo by
    default), which is what the run uses unless the flag is given."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--recipe", default="demo")
    recipe = RECIPES.get(first.parse_known_args(argv)[0].recipe, RECIPES["demo"])()  # unknown: refused later
    parser = argparse.ArgumentParser(
        prog="cluster/driver.py",
        description="Train the two-tower AlexNet (Krizhevsky et al., 2012) on a Ray cluster. Each flag overrides a "
                    "field of the recipe; its value in the recipe is in parentheses.")
    parser.add_argument("--recipe", default="demo", help=f"named run: {', '.join(RECIPES)} (default: demo)")
    parser.add_argument("--show-config", action="store_true", help="print the resolved configuration and exit")
    add_arguments(parser, recipe)
    return parser.parse_args(argv)


def resolve_location(name: str, location: str) -> str:
    """Option `name`'s path made absolute (actors may run elsewhere), or its URI as given once its
    form is valid (cluster/ckpt/storage.py: s3://, gs://, hdfs://, file://)."""
    try:
        storage.open_storage(location)
    except (ValueError, OSError) as err:  # OSError: s3:// without a region asks AWS for the bucket's
        raise ConfigError(f"{name} {location}: {storage.error_line(err)}: give a path or a URI such as "
                          f"s3://bucket/prefix") from None
    return storage.absolute(location)


def _relative(location: str) -> bool:
    """A local path that is neither absolute nor under ~ (a URI is neither)."""
    return not storage.is_uri(location) and not os.path.isabs(os.path.expanduser(location))


def durable_run_dir(run_dir: str) -> str:
    """Under a Ray job (cluster/launch/session.py), a relative run dir resolves against the
    durable root instead of Ray's temporary copy of the working directory."""
    if job_working_copy() is None or not _relative(run_dir):
        return run_dir
    return os.path.join(durable_root(), run_dir)


def check_job_paths(config: TrainConfig) -> None:
    """Under a Ray job, shards given by a relative path would be looked for in Ray's temporary copy
    of the working directory: refuse them in one line."""
    copy = job_working_copy()
    for name in ("train_data", "val_data"):
        location = getattr(config, name)
        if copy and location != DEMO_DATA and _relative(location):
            raise ConfigError(f"{name} {location!r} is relative, and this job runs in Ray's temporary copy of the "
                              f"working directory ({copy}): pass an absolute path on storage every node reaches")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe with the user's flags, paths made absolute (actors may run elsewhere); under a
    Ray job, a relative run dir made durable (`durable_run_dir`)."""
    config = build_config(args.recipe, **overrides(args))
    check_job_paths(config)
    changes = {"run_dir": resolve_location("run_dir", durable_run_dir(config.run_dir))}
    if config.resume not in ("auto", "never"):
        changes["resume"] = resolve_location("resume", config.resume)
    if config.train_data == DEMO_DATA or config.val_data == DEMO_DATA:
        demo = ensure_demo_dataset()
        log.info("demo data: %s (sha256 of its shards %s)", demo.root, demo.digest[:16])
        if config.num_classes != len(demo.class_names):
            raise ConfigError(f"num_classes {config.num_classes} must be {len(demo.class_names)} "
                              f"for the demo data ({', '.join(demo.class_names)})")
        if config.train_data == DEMO_DATA:
            changes["train_data"] = demo.train_pattern
        if config.val_data == DEMO_DATA:
            changes["val_data"] = demo.val_pattern
    config = config.replace(**changes).resolved_split()  # every actor gets the same table
    for name in ("train_data", "val_data"):
        try:
            expand_shards(getattr(config, name))
        except ValueError as err:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name}: {err}: pass {flag} with your shards (python -m data.convert makes them)") from None
    return config


def open_data(config: TrainConfig) -> tuple[InputPlan, InputPlan]:
    """The training and validation input (cluster/inputs.py `open_reader`), whose index the
    loader actors of every replica share."""
    return InputPlan(open_reader(config, "train"), "train"), InputPlan(open_reader(config, "val"), "val")


def find_start(config: TrainConfig, train_data: InputPlan) -> Start:
    """Step 0, or the checkpoint --resume names (`auto`: run_dir's newest complete one), verified
    (every shard's sha256), of the same architecture and mesh, its reader position ours. The
    driver must reach run_dir, else ConfigError before any actor starts."""
    try:
        storage.open_storage(config.run_dir).makedirs()
        directory = checkpoint.find_resume(config.run_dir, config.resume)
    except OSError as err:
        raise ConfigError(f"run_dir {config.run_dir} is not reachable from the driver: "
                          f"{storage.error_line(err)}") from None
    if directory is None:
        return Start()
    manifest = checkpoint.read_manifest(directory)
    reshape = checkpoint.check_compatible(manifest, config.to_dict(), directory)
    try:
        return dataclasses.replace(resume_point(directory, manifest, train_data), reshape=reshape)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {directory}: {err}") from None


def load_checkpoint(workers: ActorMesh, start: Start) -> None:
    """Every actor its shard of `start`'s checkpoint or, from a mesh of another shape, its
    layers of the whole network gathered from all shards."""
    if not start.reshape:
        workers.load(start.directory)
        print(f"resumed from {start.directory}", flush=True)
        return
    manifest, state, momentum = consolidate_with_momentum(start.directory)
    workers.load_consolidated(state, momentum)
    saved = manifest[checkpoint.KEY_CONFIG]
    print(f"resumed from {start.directory}, re-split from {saved['replicas']} replica(s) × {saved['stages']} stage(s) "
          f"({saved['stage_split']}) × {saved['towers']} tower process(es)", flush=True)


def train_with_restarts(config: TrainConfig, env: dict, train_data: InputPlan, val_data: InputPlan,
                        start: Start, metrics: Metrics = Metrics()) -> TrainResult:
    """Train; when an actor dies or a collective fails, tear the mesh down, start a new one, load
    the newest checkpoint and go on, up to --max-restarts times. A NaN or infinite loss (the
    weights are then spoilt) goes back to the newest checkpoint once, on the same actors; a second
    one stops the run. A mesh that ended well is kept for the next run of this process
    (`ActorMesh.take`); one that failed is killed at once, but for its tower actors when only a
    loader failed (they were waiting for its batch, well). `metrics` hears of every attempt's
    start and every restart's cause."""
    restarts, nan_restored = 0, False
    env = {**env, **faults.forwarded()}  # tests' fault injection reaches the actors
    while True:
        readers = {"train": train_data.reader, "val": val_data.reader}
        workers = ActorMesh.take(config, env, wait_for_nodes=restarts > 0, readers=readers)  # a lost node may come back
        print(f"placement:\n{workers.placement_table()}", flush=True)
        print(f"precision: {workers.precision}" + (" (--precision auto: bf16 on GPU actors, fp32 on CPUs)"
                                                   if config.precision == "auto" else "")
              + ("; CPU kernels: AVX2 (--cpu-isa avx2)" if config.cpu_isa == "avx2" and not workers.uses_gpu else ""),
              flush=True)
        print(f"loaders: {workers.placement.loaders} per replica × {config.loader_threads} thread(s)"
              + ("" if config.loaders_per_replica else " (--loaders-per-replica 0: as many as the stage-0 node's spare "
                                                       "CPUs feed; 1 when the actors train on CPUs)"), flush=True)
        failed = True  # until training returns or its loss is not finite
        try:
            token = reach.leave_token(config.run_dir)
            reach.check_answers(config.run_dir, token, workers.check_storage(config.run_dir, token))
            if start.directory:
                load_checkpoint(workers, start)
            metrics.begin(start.step, start.epoch, start.directory)
            result = train(config, workers, train_data, val_data, print_fn=lambda line: print(line, flush=True),
                           start=start, metrics=metrics)
            failed = False
            return result
        except NonFiniteLoss as err:  # once: a transient fault goes away, a real divergence comes back
            failed = False  # the actors are well (only the weights are spoilt): the next attempt reuses them
            if nan_restored:
                raise NonFiniteLoss(err.step, err.loss, f"again, after going on once from {start.directory or 'step 0'}: "
                                                        "the run diverges; lower --lr or check the data") from None
            nan_restored = True
            metrics.restart("nonfinite_loss", str(err))
            start = find_start(config.replace(resume="auto"), train_data)
            print(f"{err}; going on once from {start.directory or 'step 0 (no checkpoint yet)'}", flush=True)
        except (ray.exceptions.RayError, LoaderTimeout) as err:
            if not restartable(err) or restarts >= config.max_restarts:
                if restarts:
                    print(f"giving up after {restarts} restart(s) (--max-restarts {config.max_restarts})",
                          file=sys.stderr, flush=True)
                raise
            restarts += 1
            failed = not workers.loaders_alone_failed(err)  # else the tower actors go on with new loaders
            metrics.restart(restart_cause(err), failure_cause(err))
            start = find_start(config.replace(resume="auto"), train_data)
            print(f"restart {restarts}/{config.max_restarts}: {failure_cause(err)}; going on from "
                  f"{start.directory or 'step 0 (no checkpoint yet)'}", flush=True)
        finally:
            workers.shutdown(failed=True) if failed else workers.keep()


def network_line(config: TrainConfig) -> str:
    """The network and its parameter count; the one-tower comparison net's beside the two-tower
    net's of the same configuration (§3.2 calls them about the same)."""
    model = config.model_config
    line = f"network: {model.net} ({model.variant} variant), {parameter_count(model):,} parameters"
    if model.net != "two-tower":
        line += f" (the two-tower net: {parameter_count(dataclasses.replace(model, net='two-tower')):,})"
    changed = [f"{name} {getattr(model, name)}" for name, choices in SWITCHES.items()
               if getattr(model, name) != choices[0]]
    if model.fc_width != PAPER_FC_WIDTH:
        changed.append(f"fc_width {model.fc_width}")
    return line + (f"; not the paper's: {', '.join(changed)}" if changed else "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = resolve_config(args)
        train_data, val_data = open_data(config)
        start = find_start(config, train_data)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.show_config:
        derived = {"parameters": parameter_count(config.model_config), "initial_lr": config.scaled_lr,
                   "bias_lr": config.bias_lr, "lr_schedule": describe_schedule(config)}
        print(json.dumps({**config.to_dict(), "derived": derived}, indent=1, default=list))
        return 0
    total = total_steps(config, train_data)
    if start.step >= total:
        print(f"nothing to train: {start.directory} is at step {start.step} of {total}; "
              f"raise --epochs or --max-steps to go on")
        return 0
    durable = job_working_copy() is not None and config.run_dir.startswith(durable_root() + os.sep)
    print(f"recipe {config.recipe}: {config.mesh.describe()}; run dir {config.run_dir}"
          + (f" (a Ray job's relative run dir goes under ${RUNS_ENV} or ~/alexnet-towers, not under Ray's "
             f"temporary copy of the working directory)" if durable else ""), flush=True)
    print(network_line(config), flush=True)
    if config.replicas > 1 or config.scaled_lr != config.lr:
        print(f"global batch {config.global_batch} ({config.replicas} × {config.batch_size}); initial ε "
              f"{config.scaled_lr:g} ({config.lr:g} per {config.lr_batch} images, {config.lr_scaling} scaling)",
              flush=True)
    if config.stages > 1:
        costs = layer_costs(config.model_config)
        print(f"pipeline stages ({config.schedule}, {config.microbatches} microbatch(es) per step):\n"
              f"{split_table(config.split, costs)}", flush=True)
    try:  # served from here to the end, across mesh restarts
        metrics = RunMetrics(config, train_data, val_data, total, print_fn=lambda line: print(line, flush=True))
    except OSError as err:
        print(f"error: metrics_addr {config.metrics_addr}: {err}", file=sys.stderr)
        return 2
    decoded_before = decoded_in_process()  # this process's own decodes (a test may run several drivers)
    with metrics, ray_session(config.address, config.cpus_wanted) as env:
        try:
            result = train_with_restarts(config, env, train_data, val_data, start, metrics)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (PlacementError, reach.StorageError, ray.exceptions.RayError, LoaderTimeout, NonFiniteLoss,
                DataError) as err:
            print(f"error: training failed: {err}", file=sys.stderr, flush=True)
            return 1
        metrics.finish()
    by_loader = ", ".join(f"replica {r} loader {k} {n}" for (r, k), n in sorted(metrics.decoded_by_loader.items()))
    print(f"decoded: {by_loader}; the driver {decoded_in_process() - decoded_before}", flush=True)
    report = ""
    if config.report:
        from cluster.telemetry.plots import write_report  # matplotlib: imported only to draw (0.7 s)

        try:
            report = write_report(config.run_dir)
        except Exception as err:  # the run succeeded; a plot that fails must not say otherwise
            log.warning("the report was not written: %s: %s", type(err).__name__, err)
    last = result.epochs[-1]  # the last line: where everything is (python -m cluster.report / .export take it)
    print(f"done: {result.steps} steps, val top-1 {100 * last.val_top1:.1f}%, top-5 {100 * last.val_top5:.1f}%, "
          f"{result.images_per_second:.1f} img/s, data wait {100 * result.data_wait_fraction:.1f}% of step time; "
          f"checkpoint {storage.absolute(result.checkpoint)}" + (f"; report {report}" if report else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
