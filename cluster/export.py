"""`python -m cluster.export RUN_DIR OUT.pt`: one state dict of the whole trained network.

RUN_DIR is a run dir (its newest complete checkpoint that verifies) or a checkpoint directory, a
path or a URI (`s3://bucket/run?...`, cluster/ckpt/storage.py); OUT.pt is a local file, and its
description goes to OUT.json (cluster/ckpt/consolidate.py says what each holds): the model
configuration and, for inference (`python -m cluster.predict`, `python -m cluster.infer`), the
class table, input size, mean, preprocessing and precision. The class table comes from
data.convert's manifest beside the run's shards, or from `--classes`.

Exit status: 0 written, 2 no usable checkpoint (missing, incomplete, corrupt or inconsistent) or
bad arguments.
"""

import argparse
import sys

from cluster.ckpt.checkpoint import CheckpointError
from cluster.ckpt.consolidate import LAYOUTS, export, load_export, sidecar_path

__all__ = ["export", "load_export", "main"]  # load_export: the loader README.md shows from here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.export",
        description="Write one consolidated state dict of a trained two-tower AlexNet.")
    parser.add_argument("source", help="a run dir (its newest complete checkpoint that verifies is used) "
                                       "or a checkpoint-NNNNNNNN directory: a path or a URI such as "
                                       "s3://bucket/run?endpoint_override=host:9000")
    parser.add_argument("out", help="the .pt file to write; its description goes to the same name with .json")
    parser.add_argument("--format", dest="layout", choices=LAYOUTS, default="grouped",
                        help="`grouped` (default): conv1.weight ... fc8.bias, one network with groups=2 on "
                             "conv2, conv4, conv5; `reference`: towers.{t}.layers.{layer}... names")
    parser.add_argument("--classes", metavar="FILE",
                        help="the class table to record: a data.convert manifest.json or a synset file "
                             "('wnid [name]' per line, class 0 first); default: the manifest beside the run's "
                             "training shards, if there is one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if sidecar_path(args.out) == args.out:
        print(f"error: out {args.out!r} must not end in .json: the description goes to its name with .json",
              file=sys.stderr)
        return 2
    try:
        description = export(args.source, args.out, args.layout, args.classes)
    except (CheckpointError, OSError, ValueError) as err:  # OSError: unreachable, or OUT cannot be written
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return 2
    print(f"wrote {args.out} ({description['layout']} layout, {description['parameters']:,} parameters) "
          f"from step {description['step']} of {description['checkpoint']}; description in "
          f"{sidecar_path(args.out)}")
    if description["note"]:
        print(f"note: {description['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
