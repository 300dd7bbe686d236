"""Can every actor reach the run directory the driver writes to? Both sides of one check.

Checkpoints are written by the actors (their shards) and the driver (the manifest), so all of them
must see the same run directory: a path every node mounts at the same place, or a URI every node
reaches (cluster/ckpt/storage.py). Before the first step:

1. the driver leaves a random token in RUN_DIR/.storage-check (`leave_token`);
2. every actor reads it there, with its own credentials, and writes it back to
   RUN_DIR/.storage-check.rank{R} (`answer`, which reports instead of raising);
3. the driver reads each actor's file back (`check_answers`) and removes the check's files.

Anything else (an actor that sees another run's token, or none, or whose file the driver cannot
read) stops the run with one error naming every such actor and its host.
"""

import contextlib
import dataclasses
import socket
import uuid

from cluster.ckpt import storage

CHECK_FILE = ".storage-check"  # the driver's token in the run dir


class StorageError(RuntimeError):
    """The run directory is not reachable from every actor."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """One actor's side of the check."""

    rank: int
    host: str
    ok: bool
    detail: str = ""  # why not, when not ok


def leave_token(run_dir: str) -> str:
    """Step 1: a new token in the run dir; raises StorageError if the driver cannot write there."""
    token = uuid.uuid4().hex
    run = storage.open_storage(run_dir)
    try:
        run.makedirs()
        run.child(CHECK_FILE).write_bytes(token.encode())
    except OSError as err:
        raise StorageError(f"--run-dir {run_dir}: the driver cannot write there: {storage.error_line(err)}") from None
    return token


def answer(run_dir: str, token: str, rank: int) -> Answer:
    """Step 2, in an actor: read the driver's token, leave it back in this rank's own file."""
    host = socket.gethostname()
    try:
        run = storage.open_storage(run_dir)
        if run.child(CHECK_FILE).read_bytes().decode() != token:
            return Answer(rank, host, False, f"found another run's {CHECK_FILE} in {run_dir}")
        run.child(f"{CHECK_FILE}.rank{rank}").write_bytes(token.encode())
    except (OSError, ValueError) as err:  # ValueError: a URI this process's pyarrow cannot open
        return Answer(rank, host, False, storage.error_line(err))
    return Answer(rank, host, True)


def check_answers(run_dir: str, token: str, answers: list[Answer]) -> None:
    """Step 3: every actor's file holds the token, as the driver reads it; else StorageError
    naming each actor that failed. The check's files are removed either way."""
    run = storage.open_storage(run_dir)
    try:
        failed = [a for a in answers if not a.ok or not _came_back(run, a.rank, token)]
        if failed:
            who = "; ".join(f"rank {a.rank} on {a.host}: {a.detail or 'its file did not reach the driver'}"
                            for a in failed)
            raise StorageError(f"--run-dir {run_dir} is not shared by the driver and every actor ({who}): put it on "
                               f"storage every node mounts at the same path, or on a URI (s3://, gs://, hdfs://) "
                               f"every node reaches")
    finally:
        with contextlib.suppress(OSError):  # an error above is the one to report
            for name in run.listdir():
                if name.startswith(CHECK_FILE):
                    run.child(name).delete()


def _came_back(run: storage.Storage, rank: int, token: str) -> bool:
    try:
        return run.child(f"{CHECK_FILE}.rank{rank}").read_bytes() == token.encode()
    except OSError:
        return False
