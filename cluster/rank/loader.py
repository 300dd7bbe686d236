"""`LoaderWorker`: one loader of one data-parallel replica, the process that decodes its batches.

Loader k of the K loaders of replica r holds replica r's readers (data/loader.py `ShardBatches`,
with the index the driver built: no shard is scanned again) and makes the batches b ≡ k (mod K)
of each epoch it is asked for. A batch is a pure function of (seed, epoch, replica, batch), the
reader's design, so neither which loader makes it nor how many loaders there are changes a bit of
it: the weights are the same for every K, and a checkpoint taken with one K resumes with another.

`load` returns the batch's arrays as separate results, so Ray stores each once in this node's
object store — the loaders run on the node of their replica's stage 0 (cluster/launch/loaders.py)
— and the tower actors there read them from it; the driver handles only references, and the
small `LoadReport` that comes with each batch. The driver wraps this class as a Ray actor;
nothing here imports Ray but `where`, so tests can also drive it in-process. Nor PyTorch: the
batches are numpy arrays from start to end (data/loader.py `ShardBatches.arrays`), so a loader
actor starts without it, ~1.6 CPU s and ~220 MB less (bench/actor_start.py; tests/test_loaders.py
checks that no loader process has it).
"""

import dataclasses
import os
import socket
import time

from cluster import faults
from data.loader import BatchArrays, ShardBatches

SPLITS = ("train", "val")


@dataclasses.dataclass
class LoadReport:
    """What came with one batch: this loader's work on it and the bad samples it found."""

    replica: int
    loader: int
    epoch: int
    batch: int
    decoded: int  # images decoded for it (substitutes of bad samples included)
    seconds: float  # spent making it
    bad: dict[int, str]  # sample index → reason, for samples this batch found bad (load time)


class LoaderWorker:
    def __init__(self, readers: dict[str, ShardBatches], replica: int, loader: int, loaders: int):
        """`readers`: replica 0's train and val readers (their index), or only one of them (an
        evaluation has no training split); this loader takes its replica's copies."""
        if not readers or not set(readers) <= set(SPLITS):
            raise ValueError(f"readers must be {' and/or '.join(SPLITS)}, got {sorted(readers)}")
        if not 0 <= loader < loaders:
            raise ValueError(f"loader {loader} is outside 0..{loaders - 1}")
        self.replica, self.loader, self.loaders = replica, loader, loaders
        self.readers = {split: reader.for_replica(replica) for split, reader in readers.items()}
        self._reported: dict[str, set[int]] = {split: set() for split in readers}

    def where(self) -> dict:
        """This loader's node, address and process (the driver's placement table)."""
        import ray  # only to ask for this node; the rest of this class runs without Ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "address": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "gpus": [], "pid": os.getpid()}

    def load(self, split: str, epoch: int, batch: int):
        """Batch `batch` of `epoch` of this replica's `split`: (images, labels, lighting,
        weights, LoadReport), the four as numpy arrays (lighting and weights may be None). It
        must be one of this loader's (batch ≡ loader mod loaders).

        numpy, not torch: Ray writes a numpy array into the object store and reads it back out
        without a copy (cluster/rank/staging.py `from_object_store` makes it a tensor again),
        where a tensor is pickled through torch's own serialisation — for a 9.6 MB batch of 64 at
        224², 15.2 ms actor to actor as a tensor against 7.9 ms as an array (docs/BENCHMARKS.md)."""
        if batch % self.loaders != self.loader:
            raise ValueError(f"batch {batch} belongs to loader {batch % self.loaders} of replica {self.replica}, "
                             f"not to loader {self.loader}")
        if split == "train" and faults.loader_hangs(self.replica, self.loader, epoch, batch):
            time.sleep(faults.HANG_S)
        reader = self.readers[split]
        decoded_before = reader.decoded
        started = time.perf_counter()
        made: BatchArrays = reader.arrays(epoch, batch)
        bad = {index: reason for index, reason in reader.bad_samples().items() if index not in self._reported[split]}
        self._reported[split].update(bad)
        report = LoadReport(self.replica, self.loader, epoch, batch, reader.decoded - decoded_before,
                            time.perf_counter() - started, bad)
        return made.images, made.labels, made.lighting, made.weights, report

    def shutdown(self) -> None:
        for reader in self.readers.values():
            reader.close()
