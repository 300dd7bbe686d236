"""The Ray side of the mesh: one `TowerWorker` actor per rank, their process groups, and calls that
fan out to every actor and gather the answers.

Process groups are set up the way Ray Train's torch backend does it: rank 0 reports its address
and a free port, the driver hands them to every actor, all actors initialise together and the
driver waits for them all; groups are destroyed before the actors are killed.
"""

import logging

import ray

from cluster.config import ConfigError, TrainConfig
from cluster.pipeline import StepPlan
from cluster.worker import TowerWorker

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The actors could not all be started on the cluster."""


def plan_resources(config: TrainConfig, available: dict) -> dict:
    """Resources per actor: one GPU each when the cluster has enough, else CPU threads. Raises a
    one-line error naming what is wanted and what is there when the cluster cannot hold the mesh."""
    world = config.mesh.world_size
    if available.get("GPU", 0) >= world:
        return {"num_cpus": 1, "num_gpus": 1}
    wanted = world * config.threads_per_worker
    if available.get("CPU", 0) < wanted:
        raise ConfigError(
            f"the mesh needs {wanted} CPUs ({config.mesh.describe()}, threads_per_worker "
            f"{config.threads_per_worker}) but the Ray cluster has {available.get('CPU', 0):g}: "
            f"lower --threads-per-worker or add nodes")
    return {"num_cpus": config.threads_per_worker, "num_gpus": 0}


class ActorMesh:
    def __init__(self, config: TrainConfig, env_vars: dict[str, str] | None = None):
        self.config, self.mesh = config, config.mesh
        resources = plan_resources(config, ray.cluster_resources())
        self.uses_gpu = resources["num_gpus"] > 0
        worker_cls = ray.remote(TowerWorker)
        self.actors = [
            worker_cls.options(**resources, runtime_env={"env_vars": dict(env_vars or {})},
                               max_restarts=0).remote(config, rank)
            for rank in range(config.mesh.world_size)
        ]
        self._wait_until_started(resources)
        host, port = ray.get(self.actors[0].rendezvous_address.remote())
        self.backend = self.call("init_distributed", host, port)[0]
        log.info("mesh up: %s, backend %s, rendezvous %s:%d", config.mesh.describe(), self.backend, host, port)

    def _wait_until_started(self, resources: dict) -> None:
        """Every actor up within the placement timeout, or a clear error (no silent hang when the
        cluster's resources are held by someone else)."""
        timeout = self.config.placement_timeout_s
        refs = [actor.__ray_ready__.remote() for actor in self.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            for actor in self.actors:
                ray.kill(actor)
            raise PlacementError(
                f"{len(pending)} of {len(refs)} actors did not start within {timeout:g} s: each wants "
                f"{resources}, the cluster has {ray.available_resources()} free of {ray.cluster_resources()}; "
                f"free those resources, add nodes or raise --placement-timeout-s")
        ray.get(ready)  # an actor whose constructor failed raises here

    def call(self, method: str, *args) -> list:
        """Call `method(*args)` on every actor at once; the answers in rank order. An exception in
        any actor is raised here as soon as it happens, with that actor's traceback (its partners
        may be blocked in a collective, waiting for it)."""
        return self._gather([getattr(actor, method).remote(*args) for actor in self.actors])

    @staticmethod
    def _gather(refs: list) -> list:
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])  # raises the actor's exception
            except ray.exceptions.RayTaskError as err:
                raise ActorMesh._death_behind(pending) or err
        return ray.get(refs)

    @staticmethod
    def _death_behind(pending: list, wait_s: float = 5.0) -> Exception | None:
        """When one actor dies, its partners fail first (the link or collective they were in
        broke): report the death, the cause, if Ray sees it within `wait_s`."""
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
             schedule: str | None = None, step: int = 0) -> StepPlan:
        """This step's plan; microbatches and schedule default to the configuration's."""
        m = microbatches or self.config.microbatches
        if self.config.batch_size % m:
            raise ConfigError(f"batch_size {self.config.batch_size} must be divisible by microbatches {m}")
        views = self.config.eval_views if mode == "eval" else 1
        return StepPlan(mode, m, self.config.batch_size // m * views, schedule or self.config.schedule, lr, step)

    def _step(self, method: str, plan: StepPlan, first: dict, last: dict) -> list:
        """`method(plan, **inputs)` on every actor: stage 0 gets `first` (images and what goes
        with them), the last stage `last` (labels and what goes with them), a stage that is both
        gets both."""
        refs = []
        for rank, actor in enumerate(self.actors):
            stage = self.mesh.coord(rank).stage
            inputs = {**(first if stage == 0 else {}), **(last if stage == self.mesh.stages - 1 else {})}
            refs.append(getattr(actor, method).remote(plan, **inputs))
        return self._gather(refs)

    def train_step(self, images, labels, lr: float, lighting=None, **plan) -> list[dict]:
        """One optimizer step on every actor; the reports in rank order."""
        return self._step("train_step", self.plan("train", lr, **plan), {"images": images, "lighting": lighting},
                          {"labels": labels})

    def probe(self, images, labels, lighting=None, **plan) -> list[dict]:
        """Loss, logits and gradients of one batch without a step (tests)."""
        return self._step("probe", self.plan("probe", **plan), {"images": images, "lighting": lighting},
                          {"labels": labels})

    def evaluate(self, images, labels, weights=None, **plan) -> dict:
        """Loss sum and top-k hits of one validation batch (padding rows weigh 0), from the last
        stage of tower 0 (every tower of it computes the same)."""
        results = self._step("evaluate", self.plan("eval", **plan), {"images": images},
                             {"labels": labels, "weights": weights})
        return results[self.mesh.lane(0, 0)[-1]]

    @staticmethod
    def put(value) -> "ray.ObjectRef":
        """Store `value` once in the object store; every actor reads the same copy."""
        return ray.put(value)

    def shutdown(self) -> None:
        try:
            ray.get([actor.shutdown.remote() for actor in self.actors], timeout=10)
        except Exception as err:  # a dead actor cannot tear down; killing it below is enough
            log.warning("process-group teardown failed: %s", err)
        finally:
            for actor in self.actors:
                ray.kill(actor)
