"""`python -m cluster.experiments NAME --recipe demo [--epochs E] [--run-dir DIR] [driver flags]`: the
paper's experiments as runs (cluster/telemetry/experiments.py says which, and what the paper got).

NAME is `activation`, `towers`, `lrn`, `pooling`, `all` (those four) or `dropout` (the paper's
dropout against torch's inverted form). The command trains the baseline and each
variant with the driver (`cluster.driver.main`: the same recipe, seed, data and every other flag
given here), one after the other in one Ray session, each in its own run dir RUN_DIR/<variant>
(runs whose mesh has the same shape share its actors: cluster/launch/actor_mesh.py); then it writes
RUN_DIR/experiments/NAME.md and NAME.png (for `all`, also each experiment's) and prints a summary.
A run dir that has a checkpoint is resumed, and a finished one is not trained again: run the same
command again after a stop. Every run's configuration is checked before the first one starts.

Exit status: 0 done, 1 a run failed (run the command again to go on), 2 invalid input.
"""

import argparse
import sys

from cluster import driver
from cluster.ckpt import storage
from cluster.config import ConfigError
from cluster.launch.session import ray_session
from cluster.recipes import RECIPES
from cluster.telemetry.experiments import (ABLATIONS, EXPERIMENTS, SWITCH_FLAGS, read_result, runs, summary,
                                           write_experiment)
from stages.reference import parameter_count


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.experiments", allow_abbrev=False,  # an abbreviation is the driver's flag
        description="Train the paper's network and its ablations (§3.1-§3.4, Figure 1, §6) with the same "
                    "recipe, seed and data, and write their table and figure. Any other flag is the driver's "
                    "(python cluster/driver.py --help) and applies to every run.")
    parser.add_argument("name", choices=tuple(EXPERIMENTS), help="the experiment: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--recipe", default="demo", help=f"every run's recipe: {', '.join(RECIPES)} (default: demo)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the recipe's)")
    parser.add_argument("--run-dir", default=None,
                        help="where the runs go, each in RUN_DIR/<variant>, and the tables in RUN_DIR/experiments "
                             "(default: runs/experiments-RECIPE)")
    return parser.parse_known_args(argv)


def _check_shared(flags: list[str]) -> None:
    """The switches are what the experiments vary: refuse them as the driver would read them
    (abbreviations included)."""
    given = driver.parse_args(flags)
    for flag in SWITCH_FLAGS:
        if getattr(given, flag[2:].replace("-", "_")) is not None:
            raise ConfigError(f"{flag} is the experiment's own: leave it out (the runs differ in "
                              f"{', '.join(SWITCH_FLAGS)})")
    if given.show_config:
        raise ConfigError("--show-config is the driver's: run python cluster/driver.py --show-config with a run's flags")


def main(argv: list[str] | None = None) -> int:
    args, shared = parse_args(argv)
    root = storage.absolute(args.run_dir or f"runs/experiments-{args.recipe}")
    variants = runs(args.name)
    flags = {v.name: ["--recipe", args.recipe, *(["--epochs", str(args.epochs)] if args.epochs else []), *shared,
                      *v.flags, "--run-dir", storage.join(root, v.name)] for v in variants}
    try:
        _check_shared(shared)
        if args.epochs is not None and args.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {args.epochs}")
        configs = {name: driver.resolve_config(driver.parse_args(run_flags)) for name, run_flags in flags.items()}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with ray_session(configs["baseline"].address, max(config.cpus_wanted for config in configs.values())):
        for i, variant in enumerate(variants, start=1):
            print(f"experiment {args.name}: run {i}/{len(variants)}, {variant.name} ({variant.what}) in "
                  f"{configs[variant.name].run_dir}", flush=True)
            status = driver.main(flags[variant.name])
            if status:
                print(f"error: experiment {args.name}: run {variant.name} failed (exit {status}); run the same "
                      f"command again to go on from its newest checkpoint", file=sys.stderr)
                return status
    results = {v.name: read_result(configs[v.name].run_dir, v, parameter_count(configs[v.name].model_config))
               for v in variants}
    command = " ".join(["python -m cluster.experiments", *(argv if argv is not None else sys.argv[1:])])
    for experiment in [args.name] + (list(ABLATIONS) if args.name == "all" else []):
        md, png = write_experiment(root, experiment, [results[v.name] for v in runs(experiment)], command)
        print(f"experiment {experiment}: {md}, {png}")
    for line in summary(args.name, [results[v.name] for v in variants]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
