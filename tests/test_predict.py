"""`python -m cluster.predict`: on JPEGs taken out of the validation shards it gives, per image, the
top-1 class and the probabilities of `cluster.infer`'s Parquet row for that key (the same pixels
and network; probabilities to 1e-5 relative, as a batch of other images may sum in another order);
a PNG of the same pixels too; classes are named from the export's table (the demo's manifest); a
file that is not an image is reported, skipped and makes the exit status 1; a missing model and an
unreadable export description are one line and exit 2.
"""

import json
import math
import tarfile

import pytest
from PIL import Image

from cluster import infer, predict
from cluster.export import main as export
import serving

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)


@pytest.fixture(scope="module")
def exported(tiny_demo, tmp_path_factory, local_ray):
    tmp = tmp_path_factory.mktemp("predict")
    run = serving.trained_run(tiny_demo, tmp / "run")
    assert export([str(run), str(tmp / "alexnet.pt")]) == 0
    return tmp / "alexnet.pt"


@pytest.fixture(scope="module")
def photos(tiny_demo, tmp_path_factory) -> dict:
    """Three JPEGs of the first validation shard, by key, as files; the shards they came from."""
    folder = tmp_path_factory.mktemp("photos")
    shards = serving.reshard(tiny_demo.val_pattern, folder / "val")
    with tarfile.open(f"{shards}/val-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:3]
        files = {}
        for member in members:
            path = folder / member.name
            path.write_bytes(tar.extractfile(member).read())
            files[member.name[:-4]] = path
    return {"files": files, "shards": shards}


def test_predictions_match_the_parquet_rows_of_the_same_keys(exported, photos, tmp_path, capsys, shared_ray):
    out = tmp_path / "pred"
    assert infer.main([str(exported), "--data", photos["shards"], "--out", str(out), "--concurrency", "2"]) == 0
    rows = {r["key"]: r for r in serving.parquet_rows(out)}
    files = photos["files"]
    png = tmp_path / "as.png"  # the first photo's decoded pixels, losslessly: the same prediction
    Image.open(files[next(iter(files))]).save(png)
    capsys.readouterr()
    assert predict.main([str(exported), *map(str, files.values()), str(png), "--json", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    records = json.loads((tmp_path / "p.json").read_text())["images"]
    for (key, _), record in zip(list(files.items()) + [(next(iter(files)), png)], records):
        row, ranked = rows[key], record["predictions"]
        assert ranked[0]["class"] == row["top_classes"][0], key
        assert [p["class"] for p in ranked] == row["top_classes"]
        assert all(math.isclose(p["probability"], q, rel_tol=1e-5) for p, q in zip(ranked, row["top_probs"]))
    names = json.loads(exported.with_suffix(".json").read_text())["classes"]
    assert [c["name"] for c in names][:2] == ["astronaut", "cat"]  # the demo's manifest, carried by the export
    assert records[0]["predictions"][0]["name"] == names[records[0]["predictions"][0]["class"]]["name"]
    assert "1. " in printed and names[records[0]["predictions"][0]["class"]]["name"] in printed


def test_a_file_that_is_not_an_image_is_reported_skipped_and_exit_1(exported, photos, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    photo = next(iter(photos["files"].values()))
    (folder / "a.jpg").write_bytes(photo.read_bytes())
    (folder / "notes.txt").write_text("not an image\n")
    assert predict.main([str(exported), str(folder), "--topk", "3", "--json", "-"]) == 1
    captured = capsys.readouterr()
    listed = json.loads(captured.out)["images"]
    assert [(r["file"].rsplit("/", 1)[1], r["error"] is None) for r in listed] == [("a.jpg", True), ("notes.txt", False)]
    assert len(listed[0]["predictions"]) == 3
    assert "skipped" in captured.err and "notes.txt: not an image" in captured.err


@pytest.mark.parametrize("case, phrase", [
    ("missing model", "does not exist: give an export"),
    ("bad json", "is not readable JSON"),
    ("missing image", "IMAGE"),
])
def test_bad_input_is_one_line_and_exit_2(case, phrase, exported, photos, tmp_path, capsys):
    model, image = exported, str(next(iter(photos["files"].values())))
    if case == "missing model":
        model = tmp_path / "gone.pt"
    elif case == "bad json":
        model = tmp_path / "m.pt"
        model.write_bytes(exported.read_bytes())
        (tmp_path / "m.json").write_text("{ not json")
    else:
        image = str(tmp_path / "nothing.jpg")
    assert predict.main([str(model), image]) == 2
    assert phrase in serving.one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("checkpoint_there", (True, False))
def test_a_v1_export_still_loads_with_a_note(checkpoint_there, exported, photos, tmp_path, capsys):
    """An export written before the inference fields: the resize comes from its checkpoint's
    manifest (72 here), else the paper's 256/224 ratio (64 → 73), each said in a note."""
    description = json.loads(exported.with_suffix(".json").read_text())
    old = {key: value for key, value in description.items()
           if key not in ("classes", "class_source", "input_size", "mean_rgb", "preprocessing", "precision")}
    old["format"] = "alexnet-towers export v1"
    if not checkpoint_there:
        old["checkpoint"] = str(tmp_path / "gone")
    (tmp_path / "old.pt").write_bytes(exported.read_bytes())
    (tmp_path / "old.json").write_text(json.dumps(old))
    image = str(next(iter(photos["files"].values())))
    assert predict.main([str(tmp_path / "old.pt"), image, "--json", "-"]) == 0
    captured = capsys.readouterr()
    expected = "resize 72 taken from its checkpoint" if checkpoint_there else "resizing the shorter side to 73"
    assert expected in captured.err and "records no preprocessing (an older export)" in captured.err
    assert len(json.loads(captured.out)["images"][0]["predictions"]) == 5
