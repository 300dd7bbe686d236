"""`python -m cluster.infer` (Ray Data): its Parquet predictions give the evaluation's top-1/top-5
counts exactly, with one and ten views; a corrupt shard and a non-image sample are counted and
listed, never fatal; a re-run skips the shards done and redoes a missing one; on a multi-node
cluster its actors spread over both worker nodes, and after one of them is SIGKILLed the run (and
a re-run) has every key exactly once; bad input is one line and exit 2.
"""

import json
import shutil
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import evaluate, infer
import serving
from raytools import REPO, own_head, short_tmpdir, worker_node

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory, local_ray):
    return serving.trained_run(tiny_demo, tmp_path_factory.mktemp("infer") / "run")


@pytest.fixture(scope="module")
def shards(tiny_demo, tmp_path_factory) -> str:
    """The 20 validation images in 5 shards of 4, in the reader's order."""
    return serving.reshard(tiny_demo.val_pattern, tmp_path_factory.mktemp("shards") / "val")


def infer_main(*args) -> int:
    """In this process, on the session's Ray: two actors (the default takes every CPU it has)."""
    return infer.main([str(a) for a in args] + ["--concurrency", "2"])


def evaluation(run, shards, tmp_path, views: int) -> dict:
    out = tmp_path / f"eval-{views}.json"
    assert evaluate.main([str(run), "--local", "--val-data", shards, "--eval-views", str(views), "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("views", (1, 10))
def test_parquet_top1_and_top5_are_the_evaluations(views, run, shards, tmp_path, capsys, shared_ray):
    out = tmp_path / "pred"
    assert infer_main(run, "--data", shards, "--out", out, "--views", views, "--batch-size", 3) == 0
    rows = serving.parquet_rows(out)
    assert sorted(f.name for f in out.glob("*.parquet")) == [f"val-{i:06d}.parquet" for i in range(5)]
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20
    assert all(r["error"] is None and len(r["top_classes"]) == 5 and r["top_probs"] == sorted(r["top_probs"], reverse=True)
               for r in rows)
    expected = evaluation(run, shards, tmp_path, views)
    assert serving.hits(rows) == (expected["images"], expected["top1_hits"], expected["top5_hits"])
    if views == 1:  # the trainer evaluated the centre crop: the same counts
        trainer = serving.last_epoch(run.parent)
        assert 1.0 - serving.hits(rows)[1] / 20 == trainer["val_top1_error"]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == 20 and summary["written"] == 5 and summary["bad"] == []


def test_bad_samples_are_counted_and_listed_never_fatal(run, shards, tmp_path, capsys, shared_ray):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    good = sorted(data.glob("*.tar"))
    serving.corrupt_shard(str(good[0]), data / "val-000005.tar")  # the first two samples whole, then cut
    with tarfile.open(good[1]) as tar:
        jpg = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    serving.non_image_shard(data / "val-000006.tar", jpg)
    out = tmp_path / "pred"
    assert infer_main(run, "--data", data, "--out", out, "--batch-size", 4) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["bad_by_reason"].get("undecodable image") >= 1, summary["bad"]
    assert {"shard": str(data / "val-000006.tar"), "key": "notes"} in [
        {k: b[k] for k in ("shard", "key")} for b in summary["bad"]]
    assert [b["shard"] for b in summary["broken"]] == [str(data / "val-000005.tar")]
    rows = serving.parquet_rows(out)
    by_file = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    assert len(by_file) == 7 and sum(len(v) for k, v in by_file.items() if k < "val-000005") == 20
    notes = next(r for r in by_file["val-000006.parquet"] if r["key"] == "notes")
    assert notes["error"].startswith("undecodable image") and notes["top_classes"] is None and notes["label"] == 3
    assert next(r for r in by_file["val-000006.parquet"] if r["key"] == "photo")["error"] is None
    assert "bad samples: " in printed and "broken: " in printed


def test_a_rerun_skips_complete_shards_and_redoes_a_missing_one(run, shards, tmp_path, capsys, shared_ray):
    out = tmp_path / "pred"
    assert infer_main(run, "--data", shards, "--out", out) == 0
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")}
    (out / "val-000003.parquet").unlink()
    capsys.readouterr()
    assert infer_main(run, "--data", shards, "--out", out) == 0
    assert "predicting 1 shard(s)" in capsys.readouterr().out
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")}
    assert {name for name in after if after[name] != mtimes.get(name)} == {"val-000003.parquet"}
    assert infer_main(run, "--data", shards, "--out", out) == 0
    assert "nothing to do" in capsys.readouterr().out
    rows = serving.parquet_rows(out)
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20


@pytest.mark.parametrize("case, phrase", [
    ("missing model", "does not exist: give an export"),
    ("bad json", "is not readable JSON"),
    ("no shards", "matches no files"),
    ("another model", "holds predictions made with"),
])
def test_bad_input_is_one_line_and_exit_2(case, phrase, run, shards, tmp_path, capsys):
    model, data, out = run, shards, tmp_path / "pred"
    if case == "missing model":
        model = tmp_path / "gone.pt"
    elif case == "bad json":
        model = tmp_path / "m.pt"
        model.write_bytes(b"weights")
        (tmp_path / "m.json").write_text("{ not json")
    elif case == "no shards":
        data = tmp_path / "none-*.tar"
    else:  # predictions of another model in OUT: refused, not mixed
        out.mkdir()
        meta = {"format": "alexnet-towers predictions v1", "model": "0123", "views": 1, "topk": 5}
        pq.write_table(pa.table({"key": ["a"]}).replace_schema_metadata({b"alexnet-towers": json.dumps(meta)}),
                       out / "val-000000.parquet")
    assert infer_main(model, "--data", data, "--out", out) == 2
    assert phrase in serving.one_line_error(capsys.readouterr().err)


# --- a multi-node cluster: a head without CPUs and two worker nodes, each its own `ray start`

@pytest.mark.timeout(600)
def test_actors_spread_over_both_nodes_and_a_killed_actor_loses_no_key(run, shards):
    with short_tmpdir("inf") as tmp, own_head(tmp, num_cpus=0) as head, \
            worker_node(head, tmp, "node_a", num_cpus=2), worker_node(head, tmp, "node_b", num_cpus=2):
        command = [sys.executable, "-m", "cluster.infer", str(run), "--data", shards, "--out", str(tmp / "pred"),
                   "--concurrency", "2", "--batch-size", "2", "--address", f"127.0.0.1:{head.gcs_port}"]
        env = {**head.env, "ALEXNET_INJECT_INFER_KILL": f"2:{tmp / 'killed'}"}  # an actor dies after its 2nd batch
        first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]  # Ray Data restarted it
        assert (tmp / "killed").exists()  # the fault happened: an actor process was SIGKILLed mid-run
        summary = json.loads((tmp / "pred" / "_summary.json").read_text())
        again = subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "all 5 shard(s) have complete predictions" in again.stdout
        rows = serving.parquet_rows(tmp / "pred")
    assert len(summary["nodes"]) == 2, summary  # actors on both worker nodes (the head has no CPUs)
    assert summary["rows"] == 20 and sum(summary["actors"].values()) == 20, summary
    assert "died or was killed" in first.stdout + first.stderr
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20  # every key exactly once
    assert all(r["error"] is None for r in rows)
