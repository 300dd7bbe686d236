"""Batch inference throughput: `cluster.infer` (Ray Data) against a plain single-process PyTorch loop
over the same shards, in one run.

Both predict every image of the same shards with the same network: an export of the paper's
network at its initialisation (seeded; the weights do not change the work), loaded by both as
`cluster.serve.model.load_model` does, so both run the reference network, channels-last, on the
GPU when there is one.

    plain   one process: read each shard's samples (data/shards.py `read_samples`), decode and
            take the centre crop (`decode_rgb`, `EvalTransform`), `normalize_batch`, forward,
            softmax and top-5, `--batch-size` images at a time; torch uses every core.
    infer   `python -m cluster.infer` in this process: Ray Data reads and decodes in CPU tasks
            and predicts in an actor pool, writing Parquet. Its images/s is over the pipeline's
            run (from the dataset's start to the last file written: actors' start and model
            load inside, Ray's own start outside).

Prints both rates and infer/plain (the issue's target on 2 cores: >= 1.0). The data is the demo's
validation shards (300 photos, shorter side 300-500), `--copies` times, unless `--data` names
shards. Run from the repository root, alone on the machine:

    .venv/bin/python bench/inference.py [--copies 4] [--json PATH]
    # a GPU cluster (from its head; shards on storage every node mounts):
    .venv/bin/python bench/inference.py --address auto --data '/data/shards/val/val-{000000..000049}.tar' \\
        --gpus-per-worker 1 --batch-size 256 --json inference.json

`--quick` is a smoke run (the suite runs it): 64×64 crops of a tiny generated dataset.
"""

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cluster import infer  # noqa: E402
from cluster.ckpt.consolidate import EXPORT_FORMAT, preprocessing  # noqa: E402
from cluster.serve.model import load_model  # noqa: E402
from cluster.serve.scoring import Scorer, image_views  # noqa: E402
from data.demo import ensure_demo_dataset  # noqa: E402
from data.shards import expand_shards, read_samples  # noqa: E402
from data.transforms import view_transform  # noqa: E402
from stages.config import ModelConfig  # noqa: E402
from stages.grouped import to_grouped  # noqa: E402
from stages.reference import TwoTowerAlexNet  # noqa: E402


def write_export(path: str, cfg: ModelConfig, resize: int) -> str:
    """An export of the paper's network at its seeded initialisation (what python -m cluster.export
    writes, without a checkpoint behind it)."""
    state = to_grouped(TwoTowerAlexNet(cfg, seed=0).state_dict(), cfg)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
    description = {"format": EXPORT_FORMAT, "layout": "grouped", "model_config": dataclasses.asdict(cfg),
                   "checkpoint": None, "step": 0, "input_size": cfg.image_size,
                   "preprocessing": preprocessing(resize, cfg.image_size), "precision": "float32", "classes": None}
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(description, f)
    return path


def copies_of(pattern: str, copies: int, folder: str) -> str:
    """`copies` links to each shard of `pattern` under other names (more images, the same files)."""
    os.makedirs(folder, exist_ok=True)
    for copy in range(copies):
        for path in expand_shards(pattern):
            os.symlink(path, os.path.join(folder, f"c{copy}-{os.path.basename(path)}"))
    return folder


def plain_loop(model_path: str, pattern: str, batch_size: int, views: int = 1) -> tuple[int, float]:
    """(images, seconds) of the single-process loop."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(model_path)
    scorer = Scorer(model, views)
    transform = view_transform(model.resize, model.crop, views)
    started, images, batch = time.perf_counter(), 0, []
    for _, jpg, _ in read_samples(expand_shards(pattern)):
        batch.append(torch.from_numpy(image_views(jpg, transform)))
        if len(batch) == batch_size:
            scorer.topk(torch.stack(batch), 5)
            images, batch = images + len(batch), []
    if batch:
        scorer.topk(torch.stack(batch), 5)
        images += len(batch)
    return images, time.perf_counter() - started


def run_infer(model_path: str, pattern: str, out: str, args: argparse.Namespace) -> dict:
    """`python -m cluster.infer` in this process; its summary."""
    command = [model_path, "--data", pattern, "--out", out, "--batch-size", str(args.batch_size)]
    for flag in ("concurrency", "gpus_per_worker", "threads_per_worker", "address"):
        value = getattr(args, flag)
        if value:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    if infer.main(command) != 0:
        raise SystemExit("cluster.infer failed")
    with open(os.path.join(out, "_summary.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on tiny data (the suite's)")
    parser.add_argument("--data", help="shards to predict (default: the demo's validation shards, --copies times)")
    parser.add_argument("--copies", type=int, default=4, help="times the demo's shards are predicted (default 4)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, help="cluster.infer's actors (default: its own)")
    parser.add_argument("--threads-per-worker", type=int, help="cluster.infer's torch threads per CPU actor")
    parser.add_argument("--gpus-per-worker", type=float, help="cluster.infer's GPUs per actor (default: its own)")
    parser.add_argument("--address", default="", help="Ray cluster for cluster.infer (default: a local one)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-inference-")
    try:
        if args.quick:
            demo = ensure_demo_dataset(os.path.join(work, "demo"), train_per_class=1, val_per_class=2,
                                       samples_per_shard=5)
            cfg, resize, pattern = ModelConfig(num_classes=10, image_size=64), 72, demo.val_pattern
            args.batch_size = min(args.batch_size, 8)
        else:
            cfg, resize = ModelConfig(), 256
            pattern = args.data or copies_of(ensure_demo_dataset().val_pattern, args.copies, os.path.join(work, "data"))
        model_path = write_export(os.path.join(work, "alexnet.pt"), cfg, resize)
        images, seconds = plain_loop(model_path, pattern, args.batch_size)
        plain = images / seconds
        print(f"plain loop: {images} images in {seconds:.1f} s, {plain:.1f} img/s", flush=True)
        summary = run_infer(model_path, pattern, os.path.join(work, "pred"), args)
        ours = summary["rows"] / summary["seconds"]
        print(f"cluster.infer: {summary['rows']} images in {summary['seconds']:.1f} s, {ours:.1f} img/s, "
              f"{len(summary['actors'])} actor(s) on {len(summary['nodes'])} node(s)")
        ratio = ours / plain
        print(f"ratio infer / plain: {ratio:.2f}x ({os.cpu_count()} cores here)")
        result = {"images": images, "plain_images_per_second": plain, "infer_images_per_second": ours,
                  "ratio": ratio, "infer": summary["options"], "cores": os.cpu_count(), "quick": args.quick,
                  "image_size": cfg.image_size, "resize": resize}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
