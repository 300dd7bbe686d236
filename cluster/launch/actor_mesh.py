"""The Ray side of the mesh: one `TowerWorker` actor per rank, their process groups, and one typed
method per call that fans out to every actor and gathers the answers in rank order.

Process groups are set up the way Ray Train's torch backend does it: rank 0 reports its address
and a free port, the driver hands them to every actor, all actors initialise together and the
driver waits for them all; groups are destroyed before the actors are killed.
"""

import logging
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from cluster.ckpt.reach import Answer
from cluster.config import ConfigError, TrainConfig
from cluster.rank.pipeline import StepPlan
from cluster.launch.loaders import FedBatch, LoaderPool, LoaderTimeout
from cluster.launch.placement_groups import place, release
from cluster.launch.failures import restartable
from cluster.plan.placement import PlacementError, format_placement
from cluster.rank.precision import resolve
from cluster.rank.report import EvalScores, ProbeReport, StepReport
from cluster.rank.worker import TowerWorker
from data.loader import ShardBatches
from stages.optim import Rates

__all__ = ["ActorMesh", "PlacementError"]

log = logging.getLogger(__name__)

_idle: "ActorMesh | None" = None  # the live mesh a finished run left for the next (`keep`, `take`)


class ActorMesh:
    """The tower actors of `config.mesh` and, given `readers` (replica 0's train and val readers,
    their index; cluster/inputs.py), each replica's loader actors (cluster/launch/loaders.py),
    which then feed `batches`. Without readers, the caller hands every step its tensors (tests).

    `wait_for_nodes`: a cluster too small for the mesh is waited for (a restart: a lost node's
    capacity may come back) for up to --placement-timeout-s, instead of reported at once.

    Reuse: a run that ended cleanly `keep`s its mesh; the next run of this process `take`s it,
    configured afresh (weights, optimizer, precision and loaders as a new mesh's) if it wants
    the same processes, or shuts it down and starts its own. Runs one after another in one
    process (cluster/experiments.py, a sweep, the tests) start their actors once per shape."""

    def __init__(self, config: TrainConfig, env_vars: dict[str, str] | None = None, wait_for_nodes: bool = False,
                 readers: dict[str, ShardBatches] | None = None):
        ActorMesh.shutdown_idle()  # its resources may be the ones this mesh needs
        self.config, self.mesh = config, config.mesh
        self.env_vars, self.processes = dict(env_vars or {}), self._processes(config, env_vars, readers)
        self.placement = place(config, readers is not None, wait_for_nodes)
        self.groups = self.placement.groups
        self.uses_gpu = "GPU" in self.placement.per_actor
        self.actors, self.loaders = [], None
        try:
            self._start(self.placement.per_actor, self.env_vars, readers)
        except BaseException:
            self.shutdown(failed=True)
            raise
        log.info("mesh up: %s, backend %s, rendezvous %s:%d", config.mesh.describe(), self.backend, *self.rendezvous)

    @property
    def precision(self) -> str:
        """What the actors compute in: --precision resolved for their device."""
        return resolve(self.config.precision, "cuda" if self.uses_gpu else "cpu")

    @staticmethod
    def _processes(config: TrainConfig, env_vars: dict[str, str] | None, readers) -> tuple:
        """What fixes a mesh's processes: their number, placement, environment and process groups.
        The rest of a configuration, live actors take (`TowerWorker.configure`)."""
        return (config.mesh, config.collective_timeout_s, config.threads_per_worker, config.pinned_stages,
                config.loaders_per_replica, config.loader_threads, config.cpu_isa, readers is not None,
                tuple(sorted((env_vars or {}).items())))

    @classmethod
    def take(cls, config: TrainConfig, env_vars: dict[str, str] | None = None, wait_for_nodes: bool = False,
             readers: dict[str, ShardBatches] | None = None) -> "ActorMesh":
        """The mesh a finished run kept (`keep`), configured for `config` with fresh weights and new
        loaders, if its processes are the ones `config` wants; else a new mesh."""
        global _idle
        idle, _idle = _idle, None
        if idle is not None and idle.processes == cls._processes(config, env_vars, readers) and idle._in_this_ray():
            try:
                idle._configure(config, readers)
                return idle
            except ray.exceptions.RayError as err:  # an actor died while idle: start afresh
                log.warning("the kept mesh could not be reused: %s", err)
                idle.shutdown(failed=True)
        _idle = idle  # the constructor shuts it down
        return cls(config, env_vars, wait_for_nodes, readers)

    def keep(self) -> None:
        """Leave the tower actors running for the next `take` of this process (the loaders, which
        hold a run's data, stop)."""
        global _idle
        if self.loaders is not None:
            self.loaders.shutdown()
            self.loaders = None
        if _idle is not self:
            ActorMesh.shutdown_idle()
        self.cluster = ray.get_runtime_context().get_node_id()  # a Ray started again has new nodes
        _idle = self

    @staticmethod
    def shutdown_idle() -> None:
        """Shut the kept mesh down, if any (before its Ray is, or when its resources are wanted)."""
        global _idle
        idle, _idle = _idle, None
        if idle is not None and idle._in_this_ray():
            idle.shutdown()

    def _in_this_ray(self) -> bool:
        """Whether this kept mesh's actors belong to the Ray this process is connected to now."""
        return ray.is_initialized() and self.cluster == ray.get_runtime_context().get_node_id()

    def loaders_alone_failed(self, err: Exception) -> bool:
        """Whether `err` is only a loader's failure (it hung, or its process died): the tower
        actors, which were waiting for its batch, are well and can be kept."""
        if isinstance(err, LoaderTimeout):
            return True
        loaders = self.loaders.all_actors if self.loaders is not None else []
        return isinstance(err, ray.exceptions.RayActorError) and err.actor_id in {
            actor._actor_id.hex() for actor in loaders}

    def _configure(self, config: TrainConfig, readers: dict[str, ShardBatches] | None) -> None:
        self._gather([actor.configure.remote(config) for actor in self.actors])
        self.config = config
        if readers is not None:
            self.loaders = self._loaders(readers)
            self._wait_until_started(self.placement.per_actor)
            self.loaders.located()
        log.info("mesh reused: %s, its actors configured afresh", config.mesh.describe())

    def _loaders(self, readers: dict[str, ShardBatches]) -> LoaderPool:
        return LoaderPool(self.groups, readers, self.placement.loaders, self.placement.loader_cpus, self.env_vars,
                          self.config.prefetch, self.config.loader_timeout_s)

    def _start(self, per_actor: dict, env_vars: dict[str, str], readers: dict[str, ShardBatches] | None) -> None:
        if readers is not None:
            self.loaders = self._loaders(readers)
        worker_cls = ray.remote(TowerWorker)
        if self.config.cpu_isa == "avx2":  # read by oneDNN when the actor's torch starts
            env_vars = {**env_vars, "ONEDNN_MAX_CPU_ISA": "AVX2"}
        for rank in range(self.mesh.world_size):
            coord = self.mesh.coord(rank)
            strategy = PlacementGroupSchedulingStrategy(self.groups[coord.replica],
                                                        placement_group_bundle_index=coord.stage)
            self.actors.append(worker_cls.options(
                num_cpus=per_actor["CPU"], num_gpus=per_actor.get("GPU", 0), scheduling_strategy=strategy,
                runtime_env={"env_vars": env_vars} if env_vars else None, max_restarts=0).remote(self.config, rank))
        self._wait_until_started(per_actor)
        self.where = self._gather([actor.where.remote() for actor in self.actors])
        if self.loaders is not None:
            self.loaders.located()
        self.rendezvous = ray.get(self.actors[0].rendezvous_address.remote())
        host, port = self.rendezvous
        self.backend = self._gather([actor.init_distributed.remote(host, port) for actor in self.actors])[0]

    def placement_table(self) -> str:
        loaders = self.loaders.where if self.loaders is not None else []
        return format_placement(self.mesh, self.where, self.placement.per_actor, loaders, self.placement.loader_cpus)

    def batches(self, split: str, epoch: int, start: int, count: int) -> Iterator[FedBatch]:
        """Every replica's batches start..count − 1 of `split`'s `epoch`, from the loaders."""
        if self.loaders is None:
            raise RuntimeError("this mesh has no loaders: build it with readers")
        return self.loaders.batches(split, epoch, start, count)

    def _wait_until_started(self, resources: dict) -> None:
        """Every actor up within the placement timeout, or a clear error (no silent hang when the
        cluster's resources are held by someone else)."""
        timeout = self.config.placement_timeout_s
        everyone = self.actors + (self.loaders.all_actors if self.loaders is not None else [])
        refs = [actor.__ray_ready__.remote() for actor in everyone]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise PlacementError(
                f"{len(pending)} of {len(refs)} actors did not start within {timeout:g} s: each wants "
                f"{resources}, the cluster has {ray.available_resources()} free of {ray.cluster_resources()}; "
                f"free those resources, add nodes or raise --placement-timeout-s")
        ray.get(ready)  # an actor whose constructor failed raises here

    # --- calls on every actor; each answers in rank order. An exception in any actor is raised as
    # soon as it happens, with that actor's traceback (its partners may be blocked in a
    # collective, waiting for it).

    def reset(self, seed: int) -> None:
        """Fresh weights (the paper's init from `seed`) and optimizer state on every actor."""
        self._gather([actor.reset.remote(seed) for actor in self.actors])

    def named_parameters(self) -> list[dict[str, Tensor]]:
        """Each rank's parameters under the reference network's names, on the CPU."""
        return self._gather([actor.named_parameters.remote() for actor in self.actors])

    def check_storage(self, run_dir: str, token: str) -> list[Answer]:
        """Each actor's side of the run-dir check (cluster/ckpt/reach.py)."""
        return self._gather([actor.check_storage.remote(run_dir, token) for actor in self.actors])

    def save(self, directory: str, asynchronous: bool = False) -> list[dict | None]:
        """Every rank writes its shard of checkpoint `directory`; their manifest entries (None
        while an asynchronous write goes on: `finish_save` gives them)."""
        return self._gather([actor.save.remote(directory, asynchronous) for actor in self.actors])

    def finish_save(self) -> list[dict | None]:
        """Wait for the asynchronous shard writes; their manifest entries."""
        return self._gather([actor.finish_save.remote() for actor in self.actors])

    def load(self, directory: str) -> None:
        """Every rank loads its own shard of checkpoint `directory` (same mesh shape)."""
        self._gather([actor.load.remote(directory) for actor in self.actors])

    def load_consolidated(self, state: dict, momentum: dict) -> None:
        """Every rank takes its layers from a whole network's weights and momentum (reference
        names), put once in the object store: a checkpoint of another mesh shape."""
        whole = ray.put((state, momentum))
        self._gather([actor.load_consolidated.remote(whole) for actor in self.actors])

    @staticmethod
    def _gather(refs: list) -> list:
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])  # raises the actor's exception
            except ray.exceptions.RayTaskError as err:  # a broken link may be a partner's death
                raise (ActorMesh._death_behind(pending) if restartable(err) else None) or err
        return ray.get(refs)

    @staticmethod
    def _death_behind(pending: list, wait_s: float = 5.0) -> Exception | None:
        """When one actor dies, its partners fail first (the link or collective they were in
        broke): report the death, the cause, if Ray sees it within `wait_s`. (An error of the
        training code is reported at once: its partners wait in a collective, and no death comes.)"""
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=wait_s) if pending else ([], [])
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as died:
                return died
            except ray.exceptions.RayError:
                pass
        return None

    # --- steps: one plan for every actor; images to stage 0, labels to the last stage

    def plan(self, mode: str, lr: float = 0.0, microbatches: int | None = None,
             schedule: str | None = None, step: int = 0, rates: Rates | None = None) -> StepPlan:
        """This step's plan; microbatches and schedule default to the configuration's; `rates`:
        each parameter group's ε (None: `lr` for every one)."""
        m = microbatches or self.config.microbatches
        if self.config.batch_size % m:
            raise ConfigError(f"batch_size {self.config.batch_size} must be divisible by microbatches {m}")
        views = self.config.eval_views if mode == "eval" else 1
        return StepPlan(mode, m, self.config.batch_size // m * views, schedule or self.config.schedule, lr, step,
                        rates)

    def _replicas(self, value) -> list:
        """One input per replica: a list of them, a single one when there is one replica, or None
        for none."""
        if value is None:
            return [None] * self.mesh.replicas
        if isinstance(value, (list, tuple)):
            if len(value) != self.mesh.replicas:
                raise ValueError(f"got inputs for {len(value)} replica(s), the mesh has {self.mesh.replicas}")
            return list(value)
        if self.mesh.replicas != 1:
            raise ValueError(f"the mesh has {self.mesh.replicas} replicas: pass one input per replica")
        return [value]

    def _step(self, method, plan: StepPlan, first: dict, last: dict) -> list:
        """`method(actor).remote(plan, **inputs)` on every actor (`method` picks the remote method):
        stage 0 of replica r gets `first`'s values for r (images and what goes with them), its
        last stage `last`'s (labels and what goes with them); a stage that is both gets both.
        Each value: a list with one entry per replica, or a single one for a one-replica mesh."""
        first = {key: self._replicas(value) for key, value in first.items()}
        last = {key: self._replicas(value) for key, value in last.items()}
        refs = []
        for rank, actor in enumerate(self.actors):
            coord = self.mesh.coord(rank)
            inputs = {**({key: values[coord.replica] for key, values in first.items()} if coord.stage == 0 else {}),
                      **({key: values[coord.replica] for key, values in last.items()}
                         if coord.stage == self.mesh.stages - 1 else {})}
            refs.append(method(actor).remote(plan, **inputs))
        return self._gather(refs)

    def train_step(self, images, labels, lr: float, lighting=None, **plan) -> list[StepReport]:
        """One optimizer step on every actor; the reports in rank order."""
        return self._step(lambda actor: actor.train_step, self.plan("train", lr, **plan),
                          {"images": images, "lighting": lighting}, {"labels": labels})

    def probe(self, images, labels, lighting=None, **plan) -> list[ProbeReport]:
        """Loss, logits and gradients of one batch without a step (tests)."""
        return self._step(lambda actor: actor.probe, self.plan("probe", **plan),
                          {"images": images, "lighting": lighting}, {"labels": labels})

    def evaluate(self, images, labels, weights=None, **plan) -> EvalScores:
        """Loss sum and top-k hits of one validation batch per replica (padding rows weigh 0),
        added over the replicas, each from its last stage of tower 0 (every tower of it computes
        the same)."""
        results = self.evaluate_each(images, labels, weights, **plan)
        return sum((results[rank] for rank in self.mesh.loss_ranks()), EvalScores())

    def evaluate_each(self, images, labels, weights=None, **plan) -> list[EvalScores | None]:
        """Every rank's scores of one validation batch per replica (None but at the last stages)."""
        return self._step(lambda actor: actor.evaluate, self.plan("eval", **plan), {"images": images},
                          {"labels": labels, "weights": weights})

    @staticmethod
    def put(value) -> "ray.ObjectRef":
        """Store `value` once in the object store; every actor reads the same copy."""
        return ray.put(value)

    def __enter__(self) -> "ActorMesh":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A clean exit keeps the mesh for the next `take` of this process; after an error (an
        actor may have failed) it is shut down at once."""
        self.shutdown(failed=True) if kind is not None else self.keep()

    def shutdown(self, failed: bool = False, timeout: float = 10.0) -> None:
        """Kill every actor and release the placement groups; first, unless the mesh `failed` (an
        actor may then be blocked in a collective, waiting for a partner that is gone: the teardown
        would only wait out `timeout`), tear the process groups down within `timeout`."""
        try:
            if not failed:
                ray.get([actor.shutdown.remote() for actor in self.actors], timeout=timeout)
        except Exception as err:  # a dead actor cannot tear down; killing it below is enough
            log.warning("process-group teardown failed: %s", err)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            if self.loaders is not None:
                self.loaders.shutdown()
            release(self.groups)
