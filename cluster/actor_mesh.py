"""The Ray side of the mesh: one `TowerWorker` actor per rank, their process groups, and calls that
fan out to every actor and gather the answers.

Process groups are set up the way Ray Train's torch backend does it: rank 0 reports its address
and a free port, the driver hands them to every actor, all actors initialise together and the
driver waits for them all; groups are destroyed before the actors are killed.
"""

import logging

import ray

from cluster.config import ConfigError, TrainConfig
from cluster.worker import TowerWorker

log = logging.getLogger(__name__)


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
        resources = plan_resources(config, ray.cluster_resources())
        self.uses_gpu = resources["num_gpus"] > 0
        worker_cls = ray.remote(TowerWorker)
        self.actors = [
            worker_cls.options(**resources, runtime_env={"env_vars": dict(env_vars or {})},
                               max_restarts=0).remote(config, rank)
            for rank in range(config.mesh.world_size)
        ]
        host, port = ray.get(self.actors[0].rendezvous_address.remote())
        self.backend = self.call("init_distributed", host, port)[0]
        log.info("mesh up: %s, backend %s, rendezvous %s:%d", config.mesh.describe(), self.backend, host, port)

    def call(self, method: str, *args) -> list:
        """Call `method(*args)` on every actor at once; the answers in rank order. An exception in
        any actor is raised here as soon as it happens, with that actor's traceback (its partners
        may be blocked in a collective, waiting for it)."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])  # raises the actor's exception
        return ray.get(refs)

    @staticmethod
    def put(value) -> "ray.ObjectRef":
        """Store `value` once in the object store; every actor reads the same copy."""
        return ray.put(value)

    def shutdown(self) -> None:
        try:
            ray.get([actor.shutdown.remote() for actor in self.actors], timeout=30)
        except Exception as err:  # a dead actor cannot tear down; killing it below is enough
            log.warning("process-group teardown failed: %s", err)
        finally:
            for actor in self.actors:
                ray.kill(actor)
