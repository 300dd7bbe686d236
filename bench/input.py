"""Input benchmark: images/s delivered into a tower actor that only receives and normalises its
batch (a data-only step), fed by K = 1 and K = 2 loader actors (cluster/launch/loaders.py),
against the path before them — the driver decoding each batch itself with two threads and putting
it into the object store — in one run, with the runs of the three interleaved.

The mesh is one replica of one stage with both towers in one actor (towers = 1), so the busy
processes are the K loaders (one decoding thread each) and the sink, whose normalisation costs a
few percent of a decode: at K = 2 that is two busy workers on this 2-core machine. Every path
makes the same batches (data/loader.py: a pure function of seed, epoch and batch) from the same
shards, `--shards full` (the corpus of bench/data_pipeline.py at ImageNet-like sizes) or `256`
(pre-resized by data.convert, the paper's preparation). Each step waits for the sink's answer
before the next, as a training step does; the loaders work `--prefetch` batches ahead.

    old      the driver: ShardBatches(num_threads=2) on a thread two batches ahead, ray.put of
             each tensor, then the sink's step;
    K=1/K=2  LoaderPool with K loaders of 1 thread in the replica's placement group.

img/s = images of `--epochs` epochs / wall time, median over `--rounds` rounds. Targets (issue):
K=2 >= 1.8 × K=1 and >= 1.0 × old. The sink stages its batch as a CPU tower actor does
(cluster/rank/staging.py), into a float buffer it keeps; the run also times that staging in this
process against staging into a new tensor each batch, as the tower actors did before. Run from
the repository root, alone on the machine:

    .venv/bin/python bench/input.py [--images 512] [--batch-size 64] [--epochs 2] [--rounds 3]
        [--shards full|256] [--json PATH]

`--quick` is a smoke run of every path (the suite runs it; its numbers mean nothing).
"""

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
import torch  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from cluster.launch.loaders import LoaderPool  # noqa: E402
from cluster.launch.session import ray_session  # noqa: E402
from cluster.rank.staging import HostInputs, StagedBatch, from_object_store  # noqa: E402
from data.loader import ShardBatches  # noqa: E402
from data_pipeline import FULL, RESIZED, corpus_params, default_corpus_dir, ensure_corpus  # noqa: E402

CROP, RESIZE = 224, 256
TARGET_K2_VS_K1, TARGET_K2_VS_OLD = 1.8, 1.0


def stage(images: torch.Tensor, lighting: torch.Tensor | None, host: HostInputs | None) -> torch.Tensor:
    """The batch as one microbatch of a CPU tower actor's input (cluster/rank/staging.py), normalised
    into `host`'s kept buffer (None: a new tensor)."""
    return StagedBatch(images, lighting, images.shape[0], torch.device("cpu"), torch.contiguous_format,
                       host=host).get(0)


@ray.remote(num_cpus=1)
class Sink:
    """A tower actor's data side and nothing else: its input staged as the tower actor stages it
    on a CPU (cluster/rank/staging.py, one microbatch), normalised into a float buffer kept
    from step to step."""

    def __init__(self):
        torch.set_num_threads(1)
        self.seconds = 0.0
        self.host = HostInputs()

    def consume(self, images, labels, lighting) -> int:
        started = time.thread_time()
        images, lighting = from_object_store(images), from_object_store(lighting)  # the loaders': numpy
        stage(images, lighting, self.host)
        self.seconds += time.thread_time() - started
        return int(labels.shape[0])

    def busy(self) -> float:
        """CPU seconds spent normalising since the last call: the sink's share of the cores."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def staging_cost(batch_size: int, repeats: int = 9) -> dict[str, float]:
    """Seconds per image to stage a batch on a CPU as the tower actor does, into the float
    buffers it keeps from step to step and, as before them, into new tensors: the median of
    `repeats`, the two alternating, in this process."""
    images = torch.randint(0, 256, (batch_size, 3, CROP, CROP), dtype=torch.uint8)
    lighting, host = torch.zeros(batch_size, 3), HostInputs()
    seconds: dict[str, list[float]] = {"kept": [], "new": []}
    for _ in range(repeats):
        for name, buffers in (("kept", host), ("new", None)):
            started = time.perf_counter()
            stage(images, lighting, buffers)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) / batch_size for name, values in seconds.items()}


def reader(folder: str, batch_size: int, threads: int) -> ShardBatches:
    return ShardBatches(folder, batch_size, train=True, seed=0, resize=RESIZE, crop=CROP, lighting="paper",
                        num_threads=threads)


def old_path(folder: str, batch_size: int, epochs: int, sink) -> tuple[int, float]:
    """The driver decodes (two threads, two batches ahead) and puts every tensor itself."""
    local = reader(folder, batch_size, threads=2)
    slots: queue.Queue = queue.Queue(maxsize=2)

    def produce():
        for epoch in range(epochs):
            for batch in local.epoch_batches(epoch):
                slots.put((ray.put(batch.images), ray.put(batch.labels), ray.put(batch.lighting)))
        slots.put(None)

    started = time.perf_counter()
    threading.Thread(target=produce, daemon=True).start()
    images = 0
    while (item := slots.get()) is not None:
        images += ray.get(sink.consume.remote(*item))
    local.close()
    return images, time.perf_counter() - started


def loader_path(folder: str, batch_size: int, epochs: int, loaders: int, prefetch: int, group, sink,
                making: list[float]) -> tuple[int, float]:
    """K loader actors in the replica's placement group make the batches; the driver only passes
    references on. Appends to `making` the loaders' own seconds per image (their LoadReports:
    decode and assembly, without Ray's transfer)."""
    shared = reader(folder, batch_size, threads=1)
    pool = LoaderPool([group], {"train": shared, "val": shared}, loaders, 1, {}, prefetch, 300.0)
    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool.all_actors])
        started = time.perf_counter()
        images, seconds = 0, 0.0
        for epoch in range(epochs):
            for fed in pool.batches("train", epoch, 0, shared.batches_per_epoch):
                images += ray.get(sink.consume.remote(fed.images[0], fed.labels[0], fed.lighting[0]))
                seconds += sum(report.seconds for report in fed.reports)
        making.append(seconds / images)
        return images, time.perf_counter() - started
    finally:
        pool.shutdown()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/input.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="images in the corpus (512)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per measured run (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three paths; medians count (3)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches each loader works ahead (2)")
    parser.add_argument("--shards", choices=("full", "256"), default="full", help="full-size or pre-resized shards")
    parser.add_argument("--corpus", metavar="DIR", help="corpus folder (default: bench/data_pipeline.py's)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run for the test suite: 32 images, batch 16, "
                                                              "1 epoch, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.epochs, args.rounds = 32, 16, 1, 1
    for name in ("images", "batch_size", "epochs", "rounds", "prefetch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.images < args.batch_size:
        parser.error("--images must be >= --batch-size (only full batches are trained)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quality = 99
    corpus = ensure_corpus(args.corpus or default_corpus_dir(args.images, quality), corpus_params(args.images, quality))
    folder = os.path.join(corpus, FULL if args.shards == "full" else RESIZED)
    rates: dict[str, list[float]] = {"old": [], "K=1": [], "K=2": []}
    sink_cores: dict[str, list[float]] = {name: [] for name in rates}
    making: dict[str, list[float]] = {"K=1": [], "K=2": []}
    staging = staging_cost(args.batch_size)
    with ray_session(cpus_wanted=4, dashboard=False, actor_logs=False):  # or the Ray this process has
        group = placement_group([{"CPU": 3}], strategy="PACK")  # the sink and up to 2 loaders, one node
        ray.get(group.ready())
        sink = Sink.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote()
        ray.get(sink.__ray_ready__.remote())
        for round_ in range(args.rounds):
            for name in ("old", "K=1", "K=2") if round_ % 2 == 0 else ("K=2", "K=1", "old"):
                if name == "old":
                    images, seconds = old_path(folder, args.batch_size, args.epochs, sink)
                else:
                    images, seconds = loader_path(folder, args.batch_size, args.epochs, int(name[2:]), args.prefetch,
                                                  group, sink, making[name])
                rates[name].append(images / seconds)
                sink_cores[name].append(ray.get(sink.busy.remote()) / seconds)
            print(f"round {round_ + 1}: " + " | ".join(f"{n} {r[-1]:.1f} img/s" for n, r in rates.items()), flush=True)
        ray.kill(sink)
        remove_placement_group(group)
    median = {name: statistics.median(values) for name, values in rates.items()}
    k2_k1, k2_old = median["K=2"] / median["K=1"], median["K=2"] / median["old"]
    print(f"{args.shards} shards, batch {args.batch_size}, {args.epochs} epoch(s) of {args.images} images, "
          f"median of {args.rounds} round(s):")
    sink_median = {name: statistics.median(values) for name, values in sink_cores.items()}
    for name, value in median.items():
        print(f"  {name:<4} {value:8.1f} img/s   the sink normalising: {sink_median[name]:.2f} core(s), "
              f"{1000 * sink_median[name] / value:.2f} ms per image")
    for name, values in making.items():
        per_image = statistics.median(values)
        print(f"  {name}: a loader makes an image in {1000 * per_image:.2f} ms of its own time "
              f"({1 / per_image:.0f} img/s per loader; the rest of the path is Ray's transfer and scheduling)")
    print(f"staging a batch of {args.batch_size} on a CPU (cluster/rank/staging.py): into kept buffers "
          f"{1000 * staging['kept']:.3f} ms per image, into new tensors {1000 * staging['new']:.3f} ms: "
          f"{staging['new'] / staging['kept']:.1f}x")
    print(f"cores left to decode beside the sink at K=2: {os.cpu_count() - sink_median['K=2']:.2f} of "
          f"{os.cpu_count()}")
    print(f"K=2 / K=1: {k2_k1:.2f} (target >= {TARGET_K2_VS_K1})  {'met' if k2_k1 >= TARGET_K2_VS_K1 else 'MISSED'}")
    print(f"K=2 / old: {k2_old:.2f} (target >= {TARGET_K2_VS_OLD})  {'met' if k2_old >= TARGET_K2_VS_OLD else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rates": rates, "median": median, "sink_cores": sink_cores, "loader_s_per_image": making,
                       "staging_s_per_image": staging,
                       "k2_over_k1": k2_k1, "k2_over_old": k2_old}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
