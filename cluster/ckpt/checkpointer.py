"""Writing a run's checkpoints: every actor its shard, then the manifest with the reader's position
and the loop's state, then pruning to the newest `keep_checkpoints` (cluster/ckpt/checkpoint.py
has the format and its commit protocol).

With --async-checkpoint the actors copy their state (the stall) and write it in a thread while
the next step runs; `finish`, called after that step, waits for the writes (more stall only if
they are not done) and writes the manifest. Until then the checkpoint is incomplete and a resume
takes the one before.
"""

import dataclasses
import time

from cluster.ckpt import checkpoint, storage
from cluster.config import TrainConfig


class Checkpointer:
    """`workers`: the actor mesh (its `save`/`finish_save`); `reader`: the training input, whose
    `state_dict(epoch, next_batch)` is the position saved; `metrics` hears of each complete one."""

    def __init__(self, config: TrainConfig, workers, reader, print_fn, metrics):
        self.config, self.workers, self.reader, self.print_fn, self.metrics = config, workers, reader, print_fn, metrics
        self.last_step = -1
        self.pending: tuple | None = None

    def due(self, step: int, epoch_end: bool) -> bool:
        """The one rule of when a checkpoint is written (besides the run's end, always): every
        --checkpoint-every steps, or, when that is 0, at the end of every epoch."""
        every = self.config.checkpoint_every
        return (not epoch_end and step % every == 0) if every else epoch_end

    def save(self, step: int, epoch: int, next_batch: int, loop_state: dict, final: bool = False) -> str:
        """Checkpoint the position `step` (optimizer steps done), `epoch`, `next_batch`, with the
        loop's own state; returns its directory (once per step: a second call does nothing)."""
        directory = checkpoint.checkpoint_dir(self.config.run_dir, step)
        if step == self.last_step:
            return directory
        self.finish()
        storage.open_storage(directory).makedirs()
        manifest = {"step": step, "epoch": epoch, "loader": self.reader.state_dict(epoch, next_batch),
                    "trainer": loop_state}
        asynchronous = self.config.async_checkpoint and not final
        started = time.perf_counter()
        entries = self.workers.save(directory, asynchronous)
        self.pending = (directory, manifest, None if asynchronous else entries, time.perf_counter() - started, started)
        self.last_step = step
        if not asynchronous:
            self.finish()
        return directory

    def finish(self) -> None:
        """Complete the pending checkpoint, if any: its shards written, then its manifest."""
        if self.pending is None:
            return
        directory, manifest, entries, stall, began = self.pending
        self.pending = None
        started = time.perf_counter()
        if entries is None:
            entries = self.workers.finish_save()
        stall += time.perf_counter() - started
        checkpoint.write_manifest(directory, config=self.config.to_dict(), mesh=dataclasses.asdict(self.config.mesh),
                                  shard_paths=entries, **manifest)
        checkpoint.prune(self.config.run_dir, self.config.keep_checkpoints, self.config.keep_every)
        self.print_fn(f"checkpoint: {storage.absolute(directory)} (training stalled {stall:.2f} s)")
        self.metrics.checkpoint(manifest["step"], stall, time.perf_counter() - began, entries)
