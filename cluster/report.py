"""`python -m cluster.report RUN_DIR [--out DIR]`: plots and a short markdown report of a run, from its
history (cluster/telemetry/plots.py says what each file shows). It works while the run goes on.

Exit status: 0 written, 2 no history in RUN_DIR.
"""

import argparse
import sys

from cluster.ckpt import storage
from cluster.telemetry.history import HISTORY_FILE
from cluster.telemetry.plots import ReportError, write_report


def run_dir_of(location: str) -> str:
    """`location`, or its parent when that is the run dir (a checkpoint-NNNNNNNN or report
    directory, as the run's last line names them)."""
    if storage.open_storage(storage.join(location, HISTORY_FILE)).exists():
        return location
    parent = storage.parent(location)
    return parent if storage.open_storage(storage.join(parent, HISTORY_FILE)).exists() else location


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run's --run-dir (a path or a URI), or a checkpoint or report "
                                        "directory of it, as the run's last line prints them")
    parser.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        out = write_report(run_dir_of(storage.absolute(args.run_dir)), args.out and storage.absolute(args.out))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
