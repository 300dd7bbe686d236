"""Which failures a run survives: `restartable` tells a failure of the machinery (an actor process
that died, a loader that hung, a collective that failed or timed out because a peer died or
hung) from an error of the training code. The driver rebuilds the mesh from the newest
checkpoint for the first kind only; the mesh waits for a partner's death behind the first kind
only (cluster/launch/actor_mesh.py)."""

import ray
import torch.distributed as dist

from cluster.launch.loaders import LoaderTimeout


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
