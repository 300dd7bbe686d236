"""The Ray session a run uses, where a job's files go, and which failures a run survives.

`ray_session` joins the given or surrounding cluster, or starts a local one bound to 127.0.0.1
(cluster/launch/localnet.py).

Under `ray job submit --working-dir DIR`, the driver runs in Ray's unpacked copy of DIR
(`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), which Ray deletes when it cleans its
packages and replaces with a new one when the code changes. `job_working_copy` tells whether the
driver runs there; a relative run dir then resolves against `durable_root()` ($ALEXNET_RUNS, else
~/alexnet-towers) instead, so the same command resumes after a code change. `restartable` tells a failure of the machinery (an actor process
that died, a collective that failed or timed out because a peer died or hung) from an error of
the training code: the driver rebuilds the mesh from the newest checkpoint for the first kind
only.
"""

import contextlib
import json
import os

import ray
import torch.distributed as dist

from cluster.launch import localnet
from cluster.launch.loaders import LoaderTimeout


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
def ray_session(address: str = "", cpus_wanted: int = 1):
    """Join the cluster at `address` (or $RAY_ADDRESS, or the one this process is connected to
    already, which it then leaves running), else start a local one bound to 127.0.0.1 with at
    least `cpus_wanted` CPUs. Yields the environment variables actors need beyond their node's:
    none (a local Ray's processes inherit the loopback settings from this one's environment)."""
    if ray.is_initialized():
        yield {}
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        env = {}
    else:
        restore_env = localnet.apply_loopback_env()  # every listener on 127.0.0.1
        ray.init(num_cpus=max(cpus_wanted, os.cpu_count() or 1), **localnet.local_ray_init_kwargs())
        env = {}  # the raylet, and so every worker, started with loopback_env() in its environment
    try:
        yield env
    finally:
        ray.shutdown()
        if not address:
            restore_env()


# What torch.distributed's backends put in the RuntimeErrors they raise when a peer is gone or hangs.
_TRANSPORT_ERRORS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "NCCL", "Timed out")


def restartable(err: Exception) -> bool:
    """A failure of the machinery, not of the training code: an actor process that died, a loader
    that hung, or a collective or transfer that failed or timed out (a peer died or hung)."""
    if isinstance(err, (ray.exceptions.RayActorError, LoaderTimeout)):
        return True
    if not isinstance(err, ray.exceptions.RayTaskError):
        return False
    cause = err.cause
    return isinstance(cause, dist.DistError) or (
        isinstance(cause, RuntimeError) and any(marker in str(cause) for marker in _TRANSPORT_ERRORS))


def failure_cause(err: Exception) -> str:
    """One line: what failed, e.g. `ActorDiedError: The actor died unexpectedly...` or the
    error an actor raised (`RuntimeError: [gloo/...] Timed out waiting 5000ms for recv`)."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]


def restart_cause(err: Exception) -> str:
    """What a restartable failure was, in the metrics' words (cluster/telemetry/metrics.py RESTART_CAUSES)."""
    if isinstance(err, ray.exceptions.RayActorError):
        return "actor_died"
    if isinstance(err, LoaderTimeout):
        return "loader_timeout"
    return "collective_timeout" if "Timed out" in failure_cause(err) else "collective_failed"


