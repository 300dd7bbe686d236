"""The input of a data-parallel step: one batch per replica, read by that replica's reader.

Each replica r has its own `ShardBatches(replica=r, replicas=R)` (data/loader.py): the readers
split every epoch into disjoint shares with the same batch count, so the replicas step together
and no collective waits for a replica that ran out. `ReplicaReaders` steps them in lockstep and
hands the trainer one `Batch` whose tensors are lists, entry r for replica r (the actor mesh
routes each to its replica's first and last stages). The position is one (epoch, next batch) for
all: checkpoints store replica 0's reader state, which names R, and resuming checks it.
"""

import dataclasses
from collections.abc import Iterator

import torch

from data.loader import Batch, ShardBatches


def _each(parts: list[Batch], name: str) -> list | None:
    """Field `name` of every replica's batch; None if no replica has it. Row weights that only
    some replicas have (padding) are all-ones for the others."""
    values = [getattr(part, name) for part in parts]
    if all(value is None for value in values):
        return None
    if name == "weights":
        return [torch.ones(len(part.labels)) if value is None else value for part, value in zip(parts, values)]
    return values


class ReplicaReaders:
    def __init__(self, readers: list[ShardBatches]):
        if [r.replica for r in readers] != list(range(len(readers))):
            raise ValueError("readers must be replicas 0, 1, ... in order")
        self.readers = readers

    @property
    def replicas(self) -> int:
        return len(self.readers)

    @property
    def read_stats(self):
        """Skipped samples by reason, as replica 0's reader counts them: its index scan (every
        shard) and its own decodes."""
        return self.readers[0].read_stats

    @property
    def batches_per_epoch(self) -> int:
        return self.readers[0].batches_per_epoch  # the same for every replica

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch, ...` of `epoch`: each a Batch of per-replica lists."""
        for parts in zip(*(reader.epoch_batches(epoch, start_batch) for reader in self.readers)):
            yield dataclasses.replace(parts[0], images=_each(parts, "images"), labels=_each(parts, "labels"),
                                      lighting=_each(parts, "lighting"), weights=_each(parts, "weights"),
                                      indices=_each(parts, "indices"))

    def state_dict(self, epoch: int, next_batch: int) -> dict:
        return self.readers[0].state_dict(epoch, next_batch)

    def check_state(self, state) -> tuple[int, int]:
        """(epoch, next batch) of a saved reader position, checked against these readers. A
        position saved with another replica count (a checkpoint being re-split) continues
        exactly when the global batch is the same — global batch k is the same samples whatever
        the replica count — and from the start of an epoch otherwise."""
        ours = self.readers[0]
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
