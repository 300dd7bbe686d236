"""`python -m cluster.evaluate`: on the Ray mesh and in one process, with one and ten views, it
gives the trainer's own last evaluation of the same checkpoint; a checkpoint evaluates the same on
a mesh of another shape and from its export; bad input is one line and exit 2, before Ray.

Exactness (cluster/serve/evaluation.py): the mesh of the training's shape runs the trainer's
arithmetic, so its loss is the trainer's bit for bit. One process (the reference network, both
towers) normalises the softmax with one log-sum-exp over all classes where two tower processes
combine two, so the loss may differ in the last bits (tolerance 1e-6 relative); the top-1/top-5
counts must be the same.
"""

import json
import math

import pytest

from cluster import evaluate
from cluster.export import main as export
import serving

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory, local_ray):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    return serving.trained_run(tiny_demo, run_dir)


def evaluate_json(tmp_path, capsys, *args) -> tuple[dict, str]:
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}.json"
    assert evaluate.main([str(a) for a in args] + ["--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_mesh_and_local_give_the_trainers_last_evaluation(run, tmp_path, capsys, shared_ray):
    trainer = serving.last_epoch(run.parent)
    mesh, printed = evaluate_json(tmp_path, capsys, run.parent)
    local, _ = evaluate_json(tmp_path, capsys, run, "--local")
    assert mesh["step"] == local["step"] == trainer["step"] == 7 * serving.EPOCHS
    assert mesh["images"] == local["images"] == 20 and mesh["views"] == 1
    # the trainer's history keeps 1 − hits/images: the same floats, not merely close ones
    assert mesh["top1_error"] == trainer["val_top1_error"] and mesh["top5_error"] == trainer["val_top5_error"]
    assert mesh["loss"] == trainer["val_loss"]
    assert (local["top1_hits"], local["top5_hits"]) == (mesh["top1_hits"], mesh["top5_hits"])
    assert math.isclose(local["loss"], mesh["loss"], rel_tol=1e-6)
    assert mesh["training"]["top1_error"] == trainer["val_top1_error"]
    assert "this run at training time (step 14, centre crop)" in printed and "paper: ILSVRC-2012 val, 1 CNN" in printed
    assert "40.7%" in printed and "37.5%" in printed


def test_ten_views_on_the_mesh_and_in_one_process_agree(run, tmp_path, capsys, shared_ray):
    mesh, printed = evaluate_json(tmp_path, capsys, run.parent, "--eval-views", "10")
    local, _ = evaluate_json(tmp_path, capsys, run.parent, "--eval-views", "10", "--local")
    centre, _ = evaluate_json(tmp_path, capsys, run.parent, "--local")
    assert mesh["views"] == local["views"] == 10
    assert (local["top1_hits"], local["top5_hits"]) == (mesh["top1_hits"], mesh["top5_hits"])
    assert math.isclose(local["loss"], mesh["loss"], rel_tol=1e-6)
    assert mesh["loss"] != centre["loss"]  # ten views are another evaluation
    assert "note: the run's figure is of other validation data or views" in printed


def test_another_mesh_shape_and_the_export_evaluate_the_same(run, tmp_path, capsys, shared_ray):
    """Two replicas score disjoint halves (padding weighs 0) of the network re-split from the
    one-replica checkpoint; its export, in one process, scores the same."""
    same_shape, _ = evaluate_json(tmp_path, capsys, run, "--local")
    two, _ = evaluate_json(tmp_path, capsys, run, "--replicas", "2", "--batch-size", "4")
    assert export([str(run), str(tmp_path / "alexnet.pt")]) == 0
    exported, printed = evaluate_json(tmp_path, capsys, tmp_path / "alexnet.pt", "--local")
    assert "2 replica(s)" in two["mesh"]
    for other in (two, exported):
        assert (other["images"], other["top1_hits"], other["top5_hits"]) == (
            same_shape["images"], same_shape["top1_hits"], same_shape["top5_hits"])
        assert math.isclose(other["loss"], same_shape["loss"], rel_tol=1e-6)
    assert exported["training"]["step"] == 14  # the export names its checkpoint: the run's history is found


@pytest.fixture
def no_mesh(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation started (bad input must stop before)")

    monkeypatch.setattr(evaluate, "evaluate_on_mesh", refuse)
    monkeypatch.setattr(evaluate, "evaluate_in_process", refuse)


@pytest.mark.parametrize("case, phrase", [
    ("missing", "does not exist: give an export"),
    ("bad json", "is not readable JSON"),
    ("no val data", "--val-data is required for an export"),
    ("bad pattern", "--val-data: shard pattern"),
])
def test_bad_input_is_one_line_and_exit_2(case, phrase, run, tmp_path, capsys, no_mesh):
    model = tmp_path / "alexnet.pt"
    assert export([str(run), str(model)]) == 0
    sidecar = tmp_path / "alexnet.json"
    if case == "bad json":
        sidecar.write_text("{ not json")
    else:  # an export whose run is gone: it does not know its validation data
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "checkpoint": str(tmp_path / "gone")}))
    capsys.readouterr()
    args = {"missing": [tmp_path / "nothing.pt"], "bad pattern": [run, "--val-data", tmp_path / "nowhere-*.tar"]}
    assert evaluate.main([str(a) for a in args.get(case, [model])]) == 2
    assert phrase in serving.one_line_error(capsys.readouterr().err)
