"""The mesh's loader actors and the feed of batches from them: the driver decodes nothing.

Each replica r has K loader actors (cluster/rank/loader.py), placed in replica r's placement
group on the bundle of its stage 0, so they run on the node whose tower actors read the images.
Loader k makes the batches b ≡ k (mod K). A batch comes back as references: its tensors are
stored once in that node's object store and read there by both tower actors of stage 0 (the
labels, a few bytes, go to the last stage wherever it is). No image crosses a node.

Prefetch: the feed keeps `prefetch` calls outstanding on every loader, so each loader works up
to `prefetch` batches ahead of the step and the object store holds at most R × K × prefetch
batches waiting: memory stays flat. For each step the feed waits for every replica's batch (not
fetching it), and that wait is the replica's data wait. A loader that does not deliver within
`timeout_s` is reported by name (`LoaderTimeout`, which the driver treats like a collective
timeout); a loader that died raises Ray's actor error when its batch's report is read.
"""

import dataclasses
import time
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.rank.loader import LoaderWorker, LoadReport
from data.loader import ShardBatches

RESULTS = 5  # images, labels, lighting, weights, report: cluster/rank/loader.py `load`


class LoaderTimeout(RuntimeError):
    """A loader did not deliver a batch in time."""


@dataclasses.dataclass
class FedBatch:
    """One step's input: per replica, references to its batch's tensors."""

    epoch: int
    index: int  # the batch's index in its epoch
    images: list
    labels: list
    lighting: list
    weights: list
    data_wait: list[float]  # per replica: seconds the loop waited for its batch
    reports: list[LoadReport]  # per replica


class LoaderPool:
    """`loaders` loader actors per replica, each with `cpus` CPUs (its reader's decoding threads),
    in `groups[r]`'s bundle 0."""

    def __init__(self, groups: list, readers: dict[str, ShardBatches], loaders: int, cpus: float,
                 env_vars: dict[str, str], prefetch: int, timeout_s: float):
        self.loaders, self.prefetch, self.timeout_s = loaders, prefetch, timeout_s
        worker_cls = ray.remote(LoaderWorker)
        shared = ray.put(readers)  # every loader's copy of the index comes from this one object
        runtime_env = {"env_vars": dict(env_vars)} if env_vars else None  # none: a worker of the job's own env
        self.actors = [[worker_cls.options(num_cpus=cpus, max_restarts=0, runtime_env=runtime_env,
                                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                                               group, placement_group_bundle_index=0)).remote(shared, r, k, loaders)
                        for k in range(loaders)] for r, group in enumerate(groups)]
        self.where: list[list[dict]] = []
        self.most_ahead = 0  # the most batches asked for beyond the one waited for (≤ loaders × prefetch)

    @property
    def all_actors(self) -> list:
        return [actor for replica in self.actors for actor in replica]

    def located(self) -> None:
        """Ask every loader where it runs (after they started)."""
        answers = ray.get([actor.where.remote() for actor in self.all_actors])
        self.where = [answers[r * self.loaders:(r + 1) * self.loaders] for r in range(len(self.actors))]

    def _name(self, replica: int, loader: int) -> str:
        place = self.where[replica][loader] if self.where else {}
        return (f"loader {loader} of replica {replica} (pid {place.get('pid', '?')} on "
                f"{place.get('address', '?')})")

    def batches(self, split: str, epoch: int, start: int, count: int) -> Iterator[FedBatch]:
        """Batches start, start + 1, ..., count − 1 of `split`'s `epoch`, every replica's, in order."""
        pending: dict[int, list[list]] = {}  # batch → per replica its result refs
        ahead = start  # the next batch to ask for
        window = self.loaders * self.prefetch  # `prefetch` outstanding per loader
        for b in range(start, count):
            while ahead < min(b + window, count):
                pending[ahead] = [self.actors[r][ahead % self.loaders].load.options(num_returns=RESULTS)
                                  .remote(split, epoch, ahead) for r in range(len(self.actors))]
                ahead += 1
            self.most_ahead = max(self.most_ahead, ahead - b - 1)
            refs = pending.pop(b)
            waits = self._wait(refs, split, epoch, b)
            reports = ray.get([replica[4] for replica in refs])  # a dead loader's error surfaces here
            yield FedBatch(epoch, b, [r[0] for r in refs], [r[1] for r in refs], [r[2] for r in refs],
                           [r[3] for r in refs], waits, reports)

    def _wait(self, refs: list[list], split: str, epoch: int, batch: int) -> list[float]:
        """Seconds until each replica's images were ready (not fetched here), from now."""
        started = time.perf_counter()
        deadline = started + self.timeout_s
        waits = [0.0] * len(refs)
        pending = {replica[0]: r for r, replica in enumerate(refs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.perf_counter(), 0.0),
                                fetch_local=False)
            if not ready:
                late = min(pending.values())
                raise LoaderTimeout(
                    f"{self._name(late, batch % self.loaders)} did not deliver batch {batch} of epoch {epoch + 1} "
                    f"({split}) within {self.timeout_s:g} s: it hangs, or its node is overloaded (raise "
                    f"--loader-timeout-s if it is only slow)")
            for ref in ready:
                waits[pending.pop(ref)] = time.perf_counter() - started
        return waits

    def shutdown(self) -> None:
        for actor in self.all_actors:
            ray.kill(actor)
