"""The run's metrics history: one JSON object per line in `RUN_DIR/metrics.jsonl`, appended as the
run goes, so the plots and tables of `cluster/report.py` (cluster/telemetry/plots.py) cover every attempt of a run (restarts,
resumes) and survive the driver.

Records (`kind`; times are Unix seconds, `epoch` is 1-based as printed):
- `start`: a run or an attempt begins at `step` (0, or the checkpoint it resumes from), with the
  step total, steps per epoch and batch size.
- `steps`: the `log_every` steps ending at `step`: their mean loss and train top-1/top-5 error,
  images/s, learning rate, bubble, and each actor's seconds per phase (compute, exchange,
  pipeline wait, other, data wait).
- `epoch`: train and validation loss and top-1/top-5 error of one epoch, its images/s and time.
- `checkpoint`: one complete checkpoint (its stall, duration and bytes).
- `restart`: the mesh was rebuilt (`cause`, `detail`).

A `start` at step s supersedes what an earlier attempt wrote past s: an attempt that crashed at
step 37 after a checkpoint at step 30 and resumed from it logged steps 31..37 twice; `read` keeps
the resumed attempt's. A `start` at step 0 (a fresh run in an old directory) supersedes all.
"""

import dataclasses
import json
import os
import time

from cluster.ckpt import storage

HISTORY_FILE = "metrics.jsonl"


def history_path(run_dir: str) -> str:
    return storage.join(run_dir, HISTORY_FILE)


class HistoryWriter:
    """Appends records to the run's history. On a local or mounted run dir each line is written
    and flushed as it comes; on an object store (which cannot append) the lines are kept and the
    whole file is uploaded by `sync` (the driver calls it at epoch ends, checkpoints and the end)."""

    def __init__(self, run_dir: str):
        self.path = history_path(run_dir)
        self._file = None
        self._lines: list[str] = []
        if storage.is_uri(run_dir):
            stored = storage.open_storage(self.path)
            self._lines = [stored.read_bytes().decode()] if stored.exists() else []
        else:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, kind: str, **fields) -> dict:
        record = {"kind": kind, "time": time.time(), **fields}
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
        return record

    def sync(self) -> None:
        """Upload the whole history (object stores; a local file is already up to date)."""
        if self._file is None:
            storage.open_storage(self.path).write_bytes("".join(self._lines).encode())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            self.sync()


@dataclasses.dataclass
class History:
    """What a run dir's history holds once superseded records are dropped, each list in order."""

    starts: list[dict] = dataclasses.field(default_factory=list)
    steps: list[dict] = dataclasses.field(default_factory=list)
    epochs: list[dict] = dataclasses.field(default_factory=list)  # one per epoch, the newest
    checkpoints: list[dict] = dataclasses.field(default_factory=list)
    restarts: list[dict] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.steps or self.epochs)


def read_history(run_dir: str) -> History:
    """The run dir's history (see the module docstring); empty when there is none. A line cut
    short by a killed driver (the last one) is skipped."""
    history = History()
    stored = storage.open_storage(history_path(run_dir))
    if not stored.exists():
        return history
    for line in stored.read_bytes().decode().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        _add(history, record)
    return history


def _add(history: History, record: dict) -> None:
    kind = record.get("kind")
    if kind == "start":
        step = record["step"]
        if step == 0:
            history.steps, history.epochs, history.checkpoints, history.restarts = [], [], [], []
            history.starts = []
        history.steps = [r for r in history.steps if r["step"] <= step]
        history.epochs = [r for r in history.epochs if r["step"] <= step]
        history.checkpoints = [r for r in history.checkpoints if r["step"] <= step]
        history.starts.append(record)
    elif kind == "steps":
        history.steps.append(record)
    elif kind == "epoch":  # a resumed epoch (it was cut by --max-steps) replaces its earlier record
        history.epochs = [r for r in history.epochs if r["epoch"] != record["epoch"]] + [record]
    elif kind == "checkpoint":
        history.checkpoints.append(record)
    elif kind == "restart":
        history.restarts.append(record)
