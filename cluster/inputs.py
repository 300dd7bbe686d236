"""The driver's plan of a split's input: what the data is, where the run stands in it, and what the
loaders found bad. The driver opens no image and decodes nothing.

`InputPlan` holds replica 0's reader (data/loader.py `ShardBatches`) for its index: N and each
shard's share come from the converter's manifest, or from one scan of the tar headers. The
loader actors (cluster/launch/loaders.py) get that reader and make the batches; the plan gives
the batch count, the position a checkpoint stores (`state_dict`, `check_state`) and the merged
bad-sample counts: the index's own, plus every distinct sample any loader of any replica found
unreadable, against `max_bad_fraction` over the whole split.
"""

import collections
import dataclasses
import logging
import threading

from cluster.config import TrainConfig
from data.loader import DataError, IndexStats, ShardBatches

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadCounts:
    """Skipped samples by reason: the index's, and every loader's (distinct samples) merged."""

    reasons: collections.Counter

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())


def open_reader(config: TrainConfig, split: str) -> ShardBatches:
    """Replica 0's reader of `split` ("train" or "val"): its index, built once here (from the
    converter's manifest, or one scan of the tar headers; no image is opened). Replica r reads a
    disjoint share of each epoch, with the same number of batches as the others."""
    common = dict(seed=config.seed, resize=config.resize, crop=config.image_size, num_classes=config.num_classes,
                  max_bad_fraction=config.max_bad_fraction, num_threads=config.loader_threads,
                  replicas=config.replicas)
    if split == "train":
        lighting = config.variant if config.pca_lighting else None
        return ShardBatches(config.train_data, config.batch_size, train=True, lighting=lighting,
                            lighting_epochs=config.lighting_epochs, **common)
    return ShardBatches(config.val_data, config.batch_size, train=False, views=config.eval_views, **common)


class InputPlan:
    def __init__(self, reader: ShardBatches, name: str = "train"):
        """`reader`: replica 0 of `reader.replicas`; `name`: the split, for messages."""
        if reader.replica != 0:
            raise ValueError(f"the plan takes replica 0's reader, got replica {reader.replica}")
        self.reader, self.name = reader, name
        self._index: IndexStats = reader.read_stats  # what the index left out (scan or manifest)
        self._bad: dict[int, str] = {}  # sample index → reason, found by the loaders
        self._lock = threading.Lock()

    @property
    def replicas(self) -> int:
        return self.reader.replicas

    @property
    def batch_size(self) -> int:
        return self.reader.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.reader.batches_per_epoch  # the same for every replica

    @property
    def read_stats(self) -> ReadCounts:
        with self._lock:
            reasons = collections.Counter(self._index.reasons)
            reasons.update(self._bad.values())
        return ReadCounts(reasons)

    def add_bad(self, bad: dict[int, str]) -> None:
        """Samples a loader found bad; DataError past max_bad_fraction of the split."""
        with self._lock:
            self._bad.update(bad)
            found = self._index.skipped + len(self._bad)
        total = max(self.reader.num_samples + self._index.skipped, 1)
        if found / total > self.reader.max_bad_fraction:
            counts = self.read_stats
            summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.reasons.items()))
            raise DataError(f"{self.name} data {self.reader.pattern!r}: {found} of {total} samples are bad "
                            f"({found / total:.2%}; {summary}), more than max_bad_fraction="
                            f"{self.reader.max_bad_fraction:g}; fix the shards or raise max_bad_fraction")

    def state_dict(self, epoch: int, next_batch: int) -> dict:
        return self.reader.state_dict(epoch, next_batch)

    def check_state(self, state) -> tuple[int, int]:
        """(epoch, next batch) of a saved reader position, checked against this plan. A position
        saved with another replica count (a checkpoint being re-split) continues exactly when the
        global batch is the same — global batch k is the same samples whatever the replica count
        — and from the start of an epoch otherwise."""
        ours = self.reader
        if state.get("replicas") == self.replicas and state.get("batch_size") == ours.batch_size:
            return ours.check_state(state)
        saved_global = state.get("replicas", 0) * state.get("batch_size", 0)
        translated = {**state, "replica": 0, "replicas": self.replicas, "batch_size": ours.batch_size}
        if saved_global != self.replicas * ours.batch_size:
            if state.get("next_batch") != 0:
                raise ValueError(
                    f"the reader stopped at batch {state.get('next_batch')} of epoch {state.get('epoch', 0) + 1} with a "
                    f"global batch of {saved_global} ({state.get('replicas')} × {state.get('batch_size')}); with "
                    f"{self.replicas} × {ours.batch_size} it can only go on from an epoch's start: keep --replicas × "
                    f"--batch-size = {saved_global}, or resume from a checkpoint at the end of an epoch")
        return ours.check_state(translated)
