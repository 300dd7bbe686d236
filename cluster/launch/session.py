"""The Ray session a run uses, where a job's files go, and which failures a run survives.

`ray_session` joins the given or surrounding cluster, or starts a local one bound to 127.0.0.1
(cluster/launch/localnet.py).

Under `ray job submit --working-dir DIR`, the driver runs in Ray's unpacked copy of DIR
(`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), which Ray deletes when it cleans its
packages and replaces with a new one when the code changes. `job_working_copy` tells whether the
driver runs there; a relative run dir then resolves against `durable_root()` ($ALEXNET_RUNS, else
~/alexnet-towers) instead, so the same command resumes after a code change.
"""

import contextlib
import json
import os

import ray

from cluster.launch import localnet
from cluster.launch.actor_mesh import ActorMesh


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job supervisor gives a job's driver
RUNS_ENV = "ALEXNET_RUNS"
DEFAULT_DURABLE_ROOT = os.path.join("~", "alexnet-towers")


def job_working_copy() -> str | None:
    """The working directory when this process is a Ray job's driver running in Ray's copy of the
    submitted working directory, else None."""
    try:
        runtime_env = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def durable_root() -> str:
    """Where a job's relative run dirs go: $ALEXNET_RUNS, else ~/alexnet-towers (absolute)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(RUNS_ENV) or DEFAULT_DURABLE_ROOT))


@contextlib.contextmanager
def ray_session(address: str = "", cpus_wanted: int = 1, *, dashboard: bool = True, actor_logs: bool = True):
    """Join the cluster at `address` (or $RAY_ADDRESS, or the one this process is connected to
    already, which it then leaves running), else start a local one bound to 127.0.0.1 with at
    least `cpus_wanted` CPUs, its dashboard unless `dashboard` is false and the actors' output
    copied here unless `actor_logs` is (the benchmarks keep theirs clean). Yields the environment
    variables actors need beyond their node's: none (a local Ray's processes inherit the loopback
    settings from this one's environment)."""
    if ray.is_initialized():
        yield {}
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        env = {}
    else:
        restore_env = localnet.apply_loopback_env()  # every listener on 127.0.0.1
        ray.init(num_cpus=max(cpus_wanted, os.cpu_count() or 1), log_to_driver=actor_logs,
                 **localnet.local_ray_init_kwargs(include_dashboard=dashboard))
        env = {}  # the raylet, and so every worker, started with loopback_env() in its environment
    try:
        yield env
    finally:
        ActorMesh.shutdown_idle()  # a mesh kept for a next run: its process groups torn down first
        ray.shutdown()
        if not address:
            restore_env()
