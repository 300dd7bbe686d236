"""`python -m cluster.predict MODEL IMAGE... [--topk 5] [--views 1|10] [--json OUT]`: what a trained
network says about some photos.

MODEL is an export (OUT.pt with its OUT.json), a run dir or a checkpoint dir; IMAGE is a JPEG or
PNG file (any format PIL reads), or a directory of them (every file under it). Each image gets
the evaluation's preprocessing (shorter side to the trained resize, centre crop; `--views 10`:
the paper's ten views, softmax averaged; cluster/serve/scoring.py) and its `--topk` classes with
their probabilities, named from the export's class table (WordNet ID and name, from
data.convert's manifest). A file that is not an image is reported and skipped.

Exit status: 0 every file predicted, 1 some were skipped (not images, unreadable), 2 bad input
(a missing or unusable MODEL, an IMAGE that does not exist, no files).
"""

import argparse
import json
import sys

from cluster.argtypes import positive
from cluster.serve.model import ModelError, load_model
from cluster.serve.scoring import Scorer, image_files, predict_files
from data.classes import class_label



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.predict",
                                     description="Top-k classes of images by a trained two-tower AlexNet.")
    parser.add_argument("model", help="an export .pt (with its .json), a run dir or a checkpoint dir")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or directories of them")
    parser.add_argument("--topk", type=positive, default=5, help="classes shown per image (default: 5)")
    parser.add_argument("--views", type=int, choices=(1, 10), default=1,
                        help="1: the centre crop (default); 10: the paper's ten views, softmax averaged")
    parser.add_argument("--classes", metavar="FILE", help="class names from this data.convert manifest.json or "
                                                          "synset file instead of the model's own table")
    parser.add_argument("--batch-size", type=positive, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--json", metavar="OUT", help="also write the predictions as JSON to OUT (`-`: stdout only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = image_files(args.images)
        if not files:
            raise ValueError(f"no files in {', '.join(args.images)}")
        model = load_model(args.model, args.classes)
    except (ModelError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    quiet = args.json == "-"
    for note in model.notes + ([] if model.classes else ["the model has no class table: classes are shown by index "
                                                         "(export with --classes, or give --classes here)"]):
        print(f"note: {note}", file=sys.stderr)
    scorer = Scorer(model, args.views)
    records, skipped = [], 0
    for file, ranked, error in predict_files(scorer, files, model.resize, model.crop, args.topk, args.batch_size):
        if ranked is None:
            skipped += 1
            print(f"skipped {file}: not an image ({error})", file=sys.stderr)
            records.append({"file": file, "predictions": None, "error": error})
            continue
        records.append({"file": file, "error": None, "predictions": [
            {"class": c, **_names(model.classes, c), "probability": p} for c, p in ranked]})
        if not quiet:
            print(file)
            for rank, (c, p) in enumerate(ranked, 1):
                print(f"  {rank}. {100 * p:6.2f}%  {class_label(model.classes, c)}")
    if args.json:
        text = json.dumps({"model": model.source, "views": args.views, "images": records}, indent=1)
        if quiet:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
            print(f"wrote {args.json}")
    if skipped:
        print(f"{skipped} of {len(files)} file(s) skipped: not images", file=sys.stderr)
        return 1
    return 0


def _names(table: list[dict] | None, index: int) -> dict:
    entry = table[index] if table and 0 <= index < len(table) else {}
    return {"wnid": entry.get("wnid"), "name": entry.get("name")}


if __name__ == "__main__":
    sys.exit(main())
