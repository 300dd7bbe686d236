"""Helpers of the after-training tests (test_evaluate.py, test_infer.py, test_predict.py): a tiny
trained run, its validation samples cut into several shards, and damaged shards; and the check of
a command's one-line error (test_export.py too)."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from cluster.driver import main as train
from data.shards import expand_shards, read_samples, write_shards
from tartools import write_tar
from runs import tiny_run_args

EPOCHS = 2


def trained_run(demo, run_dir: Path) -> Path:
    """A seconds-long two-tower run (2 epochs of 7 steps, 64×64 crops of 72) evaluated by the
    trainer after each epoch: its last checkpoint."""
    assert train(tiny_run_args(demo, run_dir, "--epochs", str(EPOCHS))) == 0
    return sorted(run_dir.glob("checkpoint-*"))[-1]


def reshard(pattern: str, out: Path, per_shard: int = 4) -> str:
    """The samples of `pattern`, in the same order, in shards of `per_shard` (a directory): the
    validation reader indexes them in the same order, so its batches are the same."""
    write_shards(read_samples(expand_shards(pattern)), str(out), "val", per_shard)
    return str(out)


def corrupt_shard(good: str, path: Path) -> str:
    """`good` cut in the middle of its third sample's image: a truncated tar."""
    data = Path(good).read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])
    return str(path)


def non_image_shard(path: Path, good_jpg: bytes) -> str:
    """Two samples: a text file named .jpg, and a real image."""
    return write_tar(path, [("notes.jpg", b"not an image at all\n"), ("notes.cls", b"3"),
                            ("photo.jpg", good_jpg), ("photo.cls", b"1")])


def parquet_rows(out: Path) -> list[dict]:
    """Every row of every predictions file of `out`, with its file's name."""
    return [{**row, "file": f.name} for f in sorted(out.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def hits(rows: list[dict]) -> tuple[int, int, int]:
    """(images scored, top-1 hits, top-5 hits) over the rows with a label and no error."""
    scored = [r for r in rows if r["error"] is None and r["label"] is not None]
    return (len(scored), sum(r["top_classes"][0] == r["label"] for r in scored),
            sum(r["label"] in r["top_classes"][:5] for r in scored))


def last_epoch(run_dir: Path) -> dict:
    """The trainer's own last evaluation, from the run's history."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "epoch"][-1]


# What Ray's log monitor forwards into this process's stderr from other processes of the session's
# cluster, prefixed "(Name pid=N)" or "(raylet)" (coloured): an earlier test's actors winding down,
# not the command under test.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FORWARDED = re.compile(r"^\((raylet|gcs_server|.* pid=\d+[^)]*)\) ")


def one_line_error(err: str) -> str:
    lines = [line for line in (_ANSI.sub("", line) for line in err.splitlines())
             if line.strip() and not _FORWARDED.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
