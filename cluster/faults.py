"""Fault injection for tests: every `ALEXNET_INJECT_*` variable the project reads, in one place.

Each variable is read by the process it names; the driver passes every one set in its own
environment on to its actors (`forwarded`), whether it started Ray or joined one. Each fault
happens at a point of the real code path, so a test sees exactly what a real fault of that kind
would do. None is set in a normal run.

    ALEXNET_INJECT_FAILURE="RANK:STEP"
        Tower actor RANK raises a RuntimeError at the start of its STEP-th train_step (0-based,
        counted by that actor since it started or was configured for a run). Not a machinery failure: the run stops.
    ALEXNET_INJECT_NAN="STEP" or "STEP:MARKER"
        The loss the run's step STEP (1-based) reports is NaN. With MARKER (a file path) only
        while that file does not exist, and the first time creates it: a fault that does not
        come back after the run goes back to its checkpoint.
    ALEXNET_INJECT_HANG="RANK:STEP:MARKER"
        Tower actor RANK sleeps HANG_S seconds at the run's step STEP, once (while MARKER does not
        exist); its partners' collectives time out.
    ALEXNET_INJECT_INF_GRAD="RANK:STEP" or "RANK:STEP:MARKER"
        After backward at the run's step STEP, tower actor RANK puts an inf into one of its
        gradients (fp16 loss scaling must then skip that step on every actor); with MARKER, once.
    ALEXNET_INJECT_LOADER_HANG="REPLICA:LOADER:EPOCH:BATCH:MARKER"
        Loader actor LOADER of replica REPLICA sleeps HANG_S seconds when asked for training batch
        BATCH of epoch EPOCH (0-based), once (while MARKER does not exist); the driver's wait for
        that batch times out (--loader-timeout-s).
    ALEXNET_INJECT_SLOW_WRITE="SECONDS:PATTERN"
        A local atomic write (cluster/ckpt/storage.py) of a file whose path matches the fnmatch
        PATTERN writes half of its bytes to the temporary file, pauses SECONDS, then the rest
        (a test kills the writer in the pause).
    ALEXNET_INJECT_INFER_KILL="BATCH:MARKER"
        The `cluster.infer` inference actor that first finishes its BATCH-th batch (1-based,
        counted by that actor) SIGKILLs itself before returning it, once (while MARKER does not
        exist).
"""

import fnmatch
import os

FAILURE_ENV = "ALEXNET_INJECT_FAILURE"
NAN_ENV = "ALEXNET_INJECT_NAN"
HANG_ENV = "ALEXNET_INJECT_HANG"
LOADER_HANG_ENV = "ALEXNET_INJECT_LOADER_HANG"
INF_GRAD_ENV = "ALEXNET_INJECT_INF_GRAD"
SLOW_WRITE_ENV = "ALEXNET_INJECT_SLOW_WRITE"
INFER_KILL_ENV = "ALEXNET_INJECT_INFER_KILL"
HANG_S = 300.0  # how long an injected hang sleeps: longer than any test's collective timeout


def forwarded() -> dict[str, str]:
    """The fault variables set in this process, for its actors' environment."""
    return {name: value for name, value in os.environ.items() if name.startswith("ALEXNET_INJECT_")}


def failure_step(rank: int) -> int | None:
    """The step at which tower actor `rank` must raise (FAILURE_ENV), if any."""
    spec = os.environ.get(FAILURE_ENV, "")
    if not spec:
        return None
    failing_rank, step = (int(part) for part in spec.split(":"))
    return step if failing_rank == rank else None


def nan_at(step: int) -> bool:
    """Whether NAN_ENV asks for a NaN loss at the run's step `step`."""
    return _asks(NAN_ENV, step)


def hang_at(rank: int, step: int) -> bool:
    """Whether HANG_ENV asks tower actor `rank` to hang at the run's step `step`."""
    return _asks(HANG_ENV, rank, step)


def inf_gradient_at(rank: int, step: int) -> bool:
    """Whether INF_GRAD_ENV asks tower actor `rank` for an inf gradient at the run's step `step`."""
    return _asks(INF_GRAD_ENV, rank, step)


def loader_hangs(replica: int, loader: int, epoch: int, batch: int) -> bool:
    """Whether LOADER_HANG_ENV asks this loader to hang making this training batch."""
    return _asks(LOADER_HANG_ENV, replica, loader, epoch, batch)


def slow_write_pause(path: str) -> float | None:
    """Seconds a write of `path` pauses half-way (SLOW_WRITE_ENV), or None."""
    seconds, _, pattern = os.environ.get(SLOW_WRITE_ENV, "").partition(":")
    if not seconds or not fnmatch.fnmatch(path, pattern):
        return None
    return float(seconds)


def infer_kill_at(batches: int) -> bool:
    """Whether INFER_KILL_ENV asks this inference actor to die, having finished `batches` batches."""
    return _asks(INFER_KILL_ENV, batches)


def _asks(name: str, *where: int) -> bool:
    """Whether variable `name`, "N:N:...[:MARKER]" (as many integers as `where`), names `where`:
    always when it has no MARKER, else once (`_first_time`)."""
    spec = os.environ.get(name, "")
    if not spec:
        return False
    parts = spec.split(":", len(where))
    if tuple(int(part) for part in parts[:len(where)]) != where:
        return False
    return _first_time(parts[len(where)] if len(parts) > len(where) else "")


def _first_time(marker: str) -> bool:
    """True without a marker; with one, only while the marker file does not exist (creating it)."""
    if not marker:
        return True
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False
