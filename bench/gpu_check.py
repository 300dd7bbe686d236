"""GPU check: the project's GPU path on one GPU in a few minutes, where only PyTorch (2.11 or newer,
with CUDA) and Python are installed — no Ray, no webdataset, no network. Run it with
`bench/gpu_check.sh` from the repository root. `--quick` runs every part at tiny sizes in seconds:
`--device cpu --quick` is the dry run the test suite runs, so it cannot rot before a GPU comes, and
on a GPU machine `--quick` first is a check that the path works before the full measurement.

It drives the trainer's own actor class, `TowerWorker` (cluster/rank/worker.py), in this process
with towers = 1 (both towers in one process, exchanging locally), so what it times is the step a
tower actor runs: staging of the uint8 batch, normalisation and PCA lighting on the device,
autocast, the fp32 loss, backward, the paper's update on fp32 master weights.

1. correctness: the logits of one batch through the same weights on the device (fp32, TF32 off)
   and on the CPU. Tolerance: max |Δ| ≤ 1e-3 · max |logit| (cuDNN and oneDNN sum in other orders;
   fp32 through eight layers agrees to about 1e-5).
2. speed: training images/s for fp32 and bf16 × channels_last on/off at batch 128 and 512, on a
   device-resident batch (the input path is the loaders' business: docs/DATA.md), median of
   `--steps` timed steps after `--warmup` (cuDNN's algorithm search happens there), and the
   peak memory PyTorch allocated. Target (issue): >= 20,000 img/s in bf16.
3. input: when webdataset and simplejpeg are importable, the loader's training decode rate on
   one core (data/loader.py ShardBatches over freshly made JPEG shards), the figure that says
   how many cores each GPU needs (docs/SCALING.md).

It ends with the rows to paste into docs/BENCHMARKS.md, with the card's name.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cluster.config import TrainConfig  # noqa: E402
from cluster.rank.pipeline import StepPlan  # noqa: E402
from cluster.rank.worker import TowerWorker  # noqa: E402

LOGIT_TOLERANCE = 1e-3
TARGET_BF16 = 20_000


def make_config(precision: str, channels_last: bool, batch: int, size: int, classes: int) -> TrainConfig:
    return TrainConfig(recipe="gpu_check", towers=1, num_classes=classes, image_size=size, resize=size,
                       batch_size=batch, dropout=0.5, precision=precision, channels_last=channels_last,
                       train_data="unused", val_data="unused", seed=0, tf32=False)


def batch(config: TrainConfig, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, n = config.image_size, config.batch_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, config.num_classes, (n,), generator=g)
    lighting = torch.randn(n, 3, generator=g) * 5
    return images.to(device), labels, lighting.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_logits(device: torch.device, size: int, classes: int) -> float:
    """Max |Δ| / max |logit| of one batch of 8 through the same weights, device vs CPU, fp32."""
    config = make_config("fp32", False, 8, size, classes)
    worker = TowerWorker(config, 0)
    images, _, _ = batch(config, torch.device("cpu"))
    worker.model.eval()
    with torch.no_grad():
        on_device = worker.model(worker._images(images.to(worker.device), None, 8)(0)).float().cpu()
        worker.model.to("cpu")
        worker.device = torch.device("cpu")
        on_cpu = worker.model(worker._images(images, None, 8)(0)).float()
    return float((on_device - on_cpu).abs().max() / on_cpu.abs().max())


def time_training(precision: str, channels_last: bool, n: int, size: int, classes: int, warmup: int,
                  steps: int) -> dict:
    """Training img/s of one configuration and its peak memory."""
    config = make_config(precision, channels_last, n, size, classes)
    worker = TowerWorker(config, 0)
    device = worker.device
    images, labels, lighting = batch(config, device)
    plan = StepPlan("train", 1, n, lr=0.001)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, loss = [], math.nan
    for i in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        report = worker.train_step(plan, images, labels, lighting)
        sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
        loss = report.loss
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    del worker
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"precision": precision, "channels_last": channels_last, "batch": n,
            "images_per_second": n / statistics.median(seconds), "peak_bytes": peak, "loss": loss,
            "finite": math.isfinite(loss)}


def decode_rate(images: int, size: int) -> float | None:
    """The training loader's images/s on one core over JPEG shards made here, or None when the
    loader's dependencies are not installed."""
    try:
        import numpy as np
        import simplejpeg
        import webdataset  # noqa: F401  (the shard writer's)

        from data.loader import ShardBatches
        from data.shards import write_shards
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        for i in range(images):  # smooth noise: JPEGs of realistic size, not white noise
            base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
            samples.append((f"s{i:05d}", simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=90), i % 10))
        write_shards(samples, tmp, "train", images)
        reader = ShardBatches(os.path.join(tmp, "train-000000.tar"), 32, train=True, seed=0, resize=size,
                              crop=min(224, size), num_threads=1)
        list(reader.epoch_batches(0))  # warm-up: indexes the shard
        started = time.perf_counter()
        made = sum(b.images.shape[0] for b in reader.epoch_batches(1))
        return made / (time.perf_counter() - started)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu (with --quick: the suite's dry run)")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512], help="batch sizes (128 512)")
    parser.add_argument("--image-size", type=int, default=224, help="input side (224)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (10)")
    parser.add_argument("--quick", action="store_true", help="every part at tiny sizes, in seconds: batch 8 at "
                                                              "63×63, 1 warm-up and 1 timed step, a small decode")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.image_size, args.warmup, args.steps = [8], 63, 1, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (run with --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    classes = 1000 if args.image_size >= 224 else 10
    print(f"{card}; torch {torch.__version__}, CUDA {torch.version.cuda}; towers = 1, "
          f"{args.image_size}×{args.image_size}, {classes} classes", flush=True)
    started = time.perf_counter()
    error = check_logits(device, args.image_size, classes)
    verdict = "ok" if error <= LOGIT_TOLERANCE else "FAILED"
    print(f"logits, fp32, {device.type} vs cpu: max |Δ| / max |logit| = {error:.2e} (tolerance "
          f"{LOGIT_TOLERANCE:g}): {verdict}", flush=True)
    rows = []
    for n in args.batches:
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                row = time_training(precision, channels_last, n, args.image_size, classes, args.warmup, args.steps)
                rows.append(row)
                print(f"  {precision} channels_last={'on' if channels_last else 'off'} batch {n}: "
                      f"{row['images_per_second']:,.0f} img/s, peak {row['peak_bytes'] / 2**30:.2f} GiB, "
                      f"loss {row['loss']:.3f}", flush=True)
    rate = decode_rate(64, 72) if args.quick else decode_rate(256, 256)
    best = max((r for r in rows if r["precision"] == "bf16"), key=lambda r: r["images_per_second"])
    print(f"\nbest bf16: {best['images_per_second']:,.0f} img/s (target >= {TARGET_BF16:,}): "
          f"{'met' if best['images_per_second'] >= TARGET_BF16 else 'MISSED'}")
    print(f"\nrows for docs/BENCHMARKS.md ({card}, `bench/gpu_check.sh`, {time.perf_counter() - started:.0f} s):\n")
    print("| precision | channels_last | batch | training img/s | peak memory |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {'on' if r['channels_last'] else 'off'} | {r['batch']} | "
              f"{r['images_per_second']:,.0f} | {r['peak_bytes'] / 2**30:.2f} GiB |")
    print(f"\nlogits {device.type} vs cpu (fp32): {error:.2e}; loader decode on one core: "
          + (f"{rate:,.0f} img/s" if rate is not None else "not measured (webdataset or simplejpeg missing)"))
    ok = verdict == "ok" and all(r["finite"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
