"""`python -m cluster.report RUN_DIR [--out DIR]`: plots and a short markdown report of a run, from its
history (cluster/telemetry/plots.py says what each file shows). It works while the run goes on.

Exit status: 0 written, 2 no history in RUN_DIR.
"""

import argparse
import sys

from cluster.ckpt import storage
from cluster.telemetry.plots import ReportError, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run's --run-dir (a path or a URI)")
    parser.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        out = write_report(storage.absolute(args.run_dir), args.out and storage.absolute(args.out))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
