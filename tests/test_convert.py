"""Tests of data/convert.py: ImageNet-shaped and ImageFolder trees → WebDataset shards.

The source trees are tiny and made of real photographs (skimage's, rendered like ImageNet images
by data/demo.py), with the awkward files ImageNet really holds: a CMYK JPEG, a grayscale JPEG, a
PNG behind a .JPEG name, and one file that is no image at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data.convert import DONE_SUFFIX, MANIFEST, convert, main
from data.demo import CLASS_PHOTOS, _load_photo, render_sample
from data.shards import ReadStats, expand_shards, read_samples
from data.transforms import decode_rgb

REPO = Path(__file__).resolve().parents[1]

# Three synsets, listed in the synset file NOT in sorted order, so index = line number is tested:
# n01484850 → 0, n01440764 → 1, n01443537 → 2.
SYNSETS = [
    ("n01484850", "great white shark, white shark, man-eater"),
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
]
CLASS_OF = {wnid: i for i, (wnid, _) in enumerate(SYNSETS)}
PHOTO_OF = {"n01440764": "astronaut", "n01443537": "cat", "n01484850": "coffee"}
# Train: 3 synsets × 4 images + 1 garbage file = 13 files, 12 readable. Three of the 12 are
# stored awkwardly (below). Every other file is a baseline YCbCr JPEG, kept byte for byte.
AWKWARD = {
    "n01440764/n01440764_2.JPEG": "cmyk",
    "n01443537/n01443537_3.JPEG": "gray",
    "n01484850/n01484850_4.JPEG": "png",
}
GARBAGE = "n01443537/n01443537_999.JPEG"
# Validation: ILSVRC2012_val_0000000k is labelled by line k: 1-based IDs into SYNSETS.
VAL_IDS = [2, 3, 1, 1, 2, 3]
# The reference run: 13 files, 2 per shard → 7 shards (6 × 2 + 1).
RUN = dict(samples_per_shard=2, seed=0)
NUM_SHARDS = 7


@dataclasses.dataclass
class Tree:
    train: str  # SRC of the imagenet-train layout
    val: str  # SRC of the flat validation layout
    synsets: str  # LOC_synset_mapping.txt-style file, in SYNSETS order
    val_labels: str  # ILSVRC2012_validation_ground_truth.txt-style file
    pixels: dict[str, np.ndarray]  # train path relative to SRC → (H, W, 3) RGB it shows


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    root = tmp_path_factory.mktemp("imagenet")
    photos = {name: _load_photo(CLASS_PHOTOS[name]) for name in set(PHOTO_OF.values())}
    pixels = {}
    for c, wnid in enumerate(sorted(PHOTO_OF)):
        (root / "train" / wnid).mkdir(parents=True)
        for k in range(1, 5):
            rel = f"{wnid}/{wnid}_{k}.JPEG"
            jpg = render_sample(photos[PHOTO_OF[wnid]], np.random.default_rng([0, c, k]))
            data, pixels[rel] = _store(jpg, AWKWARD.get(rel))
            (root / "train" / rel).write_bytes(data)
    (root / "train" / GARBAGE).write_bytes(b"this is not an image\n" * 20)
    (root / "val").mkdir()
    for k, class_id in enumerate(VAL_IDS, 1):
        photo = photos[PHOTO_OF[SYNSETS[class_id - 1][0]]]
        jpg = render_sample(photo, np.random.default_rng([1, k]))
        (root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpg)
    synsets = root / "LOC_synset_mapping.txt"
    synsets.write_text("".join(f"{wnid} {name}\n" for wnid, name in SYNSETS))
    labels = root / "ILSVRC2012_validation_ground_truth.txt"
    labels.write_text("".join(f"{i}\n" for i in VAL_IDS))
    return Tree(str(root / "train"), str(root / "val"), str(synsets), str(labels), pixels)


def _store(jpg: bytes, kind: str | None) -> tuple[bytes, np.ndarray]:
    """The file bytes of a rendered JPEG stored as ``kind``, and the RGB pixels they show."""
    rgb = decode_rgb(jpg)  # (H, W, 3)
    if kind is None:
        return jpg, rgb
    image = Image.fromarray(rgb)
    buffer = io.BytesIO()
    if kind == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=95)
    elif kind == "gray":
        image = image.convert("L")
        image.save(buffer, "JPEG", quality=95)
        rgb = np.asarray(image.convert("RGB"))
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue(), rgb


@pytest.fixture(scope="module")
def reference(tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An uninterrupted conversion of the train tree, two worker processes."""
    out = tmp_path_factory.mktemp("reference")
    return out, convert(tree.train, out, synsets=tree.synsets, workers=2, **RUN)


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} over every shard of ``out``, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _finished(out: Path) -> list[str]:
    return sorted(p.name[: -len(DONE_SUFFIX)] for p in out.glob(f"*{DONE_SUFFIX}"))


# ---------------------------------------------------------------- ImageNet train layout


def test_round_trip(tree: Tree, reference: tuple[Path, dict]) -> None:
    out, manifest = reference
    assert manifest == _manifest(out)
    assert manifest["layout"] == "imagenet-train"
    # 13 files → 12 samples: the garbage file is skipped, with its reason.
    assert (manifest["source_files"], manifest["total_samples"]) == (13, 12)
    [skipped] = manifest["skipped"]
    assert skipped["path"] == GARBAGE and "cannot decode" in skipped["reason"]
    # Shards: 7 of them, named in order; sizes and sha256 match the files.
    names = [f"train-{i:06d}.tar" for i in range(NUM_SHARDS)]
    assert [s["shard"] for s in manifest["shards"]] == names
    assert expand_shards(str(out)) == [str(out / n) for n in names]
    assert expand_shards(str(out / manifest["pattern"])) == [str(out / n) for n in names]
    for shard in manifest["shards"]:
        data = (out / shard["shard"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    assert sum(s["samples"] for s in manifest["shards"]) == 12
    # Classes: index = line of --synsets; 4 readable images each (the garbage is skipped).
    expected = [
        {"index": i, "wnid": wnid, "name": name, "samples": 4}
        for i, (wnid, name) in enumerate(SYNSETS)
    ]
    assert manifest["classes"] == expected

    # Every sample reads back through read_samples with the label of its source folder.
    stats = ReadStats()
    samples = list(read_samples(expand_shards(str(out)), stats))
    assert (stats.samples, stats.skipped) == (12, 0)
    members = _members(out)
    assert len(members) == 12
    for key, jpg, cls in samples:
        meta = json.loads(members[key]["json"])
        rel = meta["source"]
        wnid = rel.split("/")[0]
        assert key == Path(rel).stem
        assert cls == meta["cls"] == CLASS_OF[wnid]
        assert (meta["wnid"], meta["name"]) == SYNSETS[cls]
        height, width = tree.pixels[rel].shape[:2]
        assert (meta["width"], meta["height"]) == (width, height)
        source = Path(tree.train, rel).read_bytes()
        if rel not in AWKWARD:  # a baseline JPEG already: kept byte for byte
            assert jpg == source and meta["reencoded"] is None
            continue
        # CMYK, gray and PNG come back as 3-channel (YCbCr) JPEGs showing the same picture.
        assert meta["reencoded"] in ("CMYK JPEG", "grayscale JPEG", "PNG image")
        assert simplejpeg.decode_jpeg_header(jpg)[:3] == (height, width, "YCbCr")
        assert Image.open(io.BytesIO(jpg)).mode == "RGB"
        rgb = simplejpeg.decode_jpeg(jpg)  # (H, W, 3)
        error = np.abs(rgb.astype(np.int16) - tree.pixels[rel]).mean()
        assert error < 6, f"{rel}: mean error {error:.1f} levels"


def test_resize_shorter(tree: Tree, tmp_path: Path) -> None:
    manifest = convert(tree.train, tmp_path, resize_shorter=256, workers=1, **RUN)
    assert manifest["options"]["resize_shorter"] == 256
    assert manifest["total_samples"] == 12
    for members in _members(tmp_path).values():
        meta = json.loads(members["json"])
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(members["jpg"])
        assert min(height, width) == 256 and colorspace == "YCbCr"
        # The longer side keeps the aspect ratio: round(long × 256 / short).
        short, long = sorted((meta["width"], meta["height"]))
        assert max(height, width) == round(long * 256 / short)
        assert (width > height) == (meta["width"] > meta["height"])
        assert meta["reencoded"].endswith("resized")
    # Without --synsets the classes are the sorted wnid folders, names unknown.
    assert [(c["wnid"], c["name"]) for c in manifest["classes"]] == [
        (wnid, None) for wnid in sorted(PHOTO_OF)
    ]


def test_same_seed_same_bytes_other_seed_other_order(
    tree: Tree, reference: tuple[Path, dict], tmp_path: Path
) -> None:
    ref_out, ref_manifest = reference
    # Same seed, one worker instead of two: byte-identical shards and the same manifest.
    same = convert(tree.train, tmp_path / "same", synsets=tree.synsets, workers=1, **RUN)
    assert _shard_bytes(tmp_path / "same") == _shard_bytes(ref_out)
    assert same == ref_manifest
    # Another seed: the same samples in another order.
    convert(tree.train, tmp_path / "other", synsets=tree.synsets, workers=1, **{**RUN, "seed": 1})
    ref_keys = [key for key, _, _ in read_samples(expand_shards(str(ref_out)))]
    other_keys = [key for key, _, _ in read_samples(expand_shards(str(tmp_path / "other")))]
    assert sorted(other_keys) == sorted(ref_keys) and other_keys != ref_keys


def test_shard_size_mb(tree: Tree, tmp_path: Path) -> None:
    # Rendered sources are 30–150 KB, so a 0.2 MB limit gives shards of a few files each.
    manifest = convert(tree.train, tmp_path, shard_size_mb=0.2, workers=1)
    sizes = {}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / shard["shard"]) as tar:
            sources = [
                json.loads(tar.extractfile(m).read())["source"]
                for m in tar
                if m.name.endswith(".json")
            ]
        sizes[shard["shard"]] = [os.path.getsize(os.path.join(tree.train, s)) for s in sources]
    assert len(sizes) > 2 and manifest["total_samples"] == 12
    assert all(len(s) == 1 or sum(s) <= 200_000 for s in sizes.values()), sizes


# ---------------------------------------------------------------- resume


# The CLI, slowed to 0.3 s per image so that it can be killed part-way. Workers are forked so
# that they inherit the slowed function.
SLOW_CLI = """
import multiprocessing, sys, time
import data.convert as convert
multiprocessing.set_start_method("fork", force=True)
original = convert._convert_file
def slowed(*args):
    time.sleep(0.3)
    return original(*args)
convert._convert_file = slowed
sys.exit(convert.main(sys.argv[1:]))
"""


def test_resume_after_kill(
    tree: Tree, reference: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["--src", tree.train, "--out", str(out), "--synsets", tree.synsets, "--workers", "2"]
    args += ["--samples-per-shard", "2", "--seed", "0"]
    # Kill the whole process group (driver and workers) once two shards are finished:
    # 2 workers × 2 images × 0.3 s, so after about 0.6 s of converting, long before all 7.
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_CLI, *args], cwd=REPO, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(_finished(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()
    finished = _finished(out)
    assert 2 <= len(finished) < NUM_SHARDS and not (out / MANIFEST).exists()

    # Damage: truncate one finished shard; leave junk under the name of an unfinished one, and
    # a temporary file as a worker killed while writing leaves.
    truncated, kept = finished[0], finished[1:]

    def identity(name: str) -> tuple[int, int]:
        stat = os.stat(out / name)
        return stat.st_ino, stat.st_mtime_ns

    kept_before = {name: identity(name) for name in kept}
    (out / truncated).write_bytes((out / truncated).read_bytes()[:3000])
    unfinished = next(
        f"train-{i:06d}.tar" for i in range(NUM_SHARDS) if f"train-{i:06d}.tar" not in finished
    )
    (out / unfinished).write_bytes(b"half a shard" * 100)
    (out / f".{unfinished}.tmp-99999").write_bytes(b"a temporary a killed worker left")

    # Re-run: the untouched shards are kept as they are, everything else is (re)built.
    assert main(args) == 0
    assert {name: identity(name) for name in kept} == kept_before
    ref_out, ref_manifest = reference
    assert _shard_bytes(out) == _shard_bytes(ref_out)
    assert _manifest(out) == ref_manifest
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporaries
    assert "img/s" in capsys.readouterr().err

    # A third run finds everything done and rewrites no shard.
    before = {p.name: identity(p.name) for p in out.glob("*.tar")}
    main([*args, "--quiet"])
    assert {p.name: identity(p.name) for p in out.glob("*.tar")} == before
    assert _manifest(out) == ref_manifest


# ---------------------------------------------------------------- other layouts


@pytest.mark.parametrize("labels_as", ["ids", "wnids"])
def test_val_flat_layout(tree: Tree, tmp_path: Path, labels_as: str) -> None:
    labels = tree.val_labels
    if labels_as == "wnids":  # the other accepted form of the label file
        labels = str(tmp_path / "labels.txt")
        Path(labels).write_text("".join(f"{SYNSETS[i - 1][0]}\n" for i in VAL_IDS))
    manifest = convert(
        tree.val, tmp_path / "out", prefix="val", val_labels=labels, synsets=tree.synsets,
        samples_per_shard=4, workers=1,
    )  # fmt: skip
    assert manifest["layout"] == "imagenet-val-flat"
    assert (manifest["total_samples"], len(manifest["shards"]), manifest["skipped"]) == (6, 2, [])
    assert [c["samples"] for c in manifest["classes"]] == [2, 2, 2]
    members = _members(tmp_path / "out")
    assert sorted(members) == [f"ILSVRC2012_val_{k:08d}" for k in range(1, 7)]
    for key, _, cls in read_samples(expand_shards(str(tmp_path / "out"))):
        number = int(key.rsplit("_", 1)[1])
        assert cls == VAL_IDS[number - 1] - 1  # IDs are 1-based, class indices 0-based
        meta = json.loads(members[key]["json"])
        assert (meta["wnid"], meta["name"]) == SYNSETS[cls]
        assert members[key]["jpg"] == Path(tree.val, f"{key}.JPEG").read_bytes()


def test_imagefolder_layout(tmp_path: Path) -> None:
    photo = _load_photo(CLASS_PHOTOS["cat"])
    views = [np.asarray(photo.crop((40 * i, 30 * i, 40 * i + 96, 30 * i + 72))) for i in range(4)]
    src = tmp_path / "flowers"
    files = {  # path → image bytes; "a" is a name in both classes
        "tulip/a.jpg": simplejpeg.encode_jpeg(views[0]),
        "tulip/more/b.png": _pil_bytes(views[1], "PNG"),
        "rose/a.JPG": simplejpeg.encode_jpeg(views[2]),
        "rose/c.jpeg": simplejpeg.encode_jpeg(views[3]),
        "rose/p.jpg": _pil_bytes(views[2], "JPEG", progressive=True),  # re-encoded as baseline
        "rose/cut.jpg": simplejpeg.encode_jpeg(views[3])[:-500],  # truncated: skipped
        "rose/notes.txt": b"not an image name: ignored",
        ".thumbs/x.jpg": simplejpeg.encode_jpeg(views[0]),  # hidden: ignored
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    manifest = convert(src, tmp_path / "out", prefix="flowers", samples_per_shard=10, workers=1)
    assert manifest["layout"] == "imagefolder"
    # Classes sorted by folder name: rose 0, tulip 1.
    assert [(c["wnid"], c["name"], c["samples"]) for c in manifest["classes"]] == [
        (None, "rose", 3),
        (None, "tulip", 2),
    ]
    assert [s["path"] for s in manifest["skipped"]] == ["rose/cut.jpg"]
    # Colliding stems fall back to the relative path; the others keep their stem.
    labels = {key: cls for key, _, cls in read_samples(expand_shards(str(tmp_path / "out")))}
    assert labels == {"rose_a": 0, "c": 0, "p": 0, "tulip_a": 1, "b": 1}
    meta = {key: json.loads(m["json"]) for key, m in _members(tmp_path / "out").items()}
    assert (meta["b"]["source"], meta["b"]["reencoded"]) == ("tulip/more/b.png", "PNG image")
    assert (meta["b"]["width"], meta["b"]["height"]) == (96, 72)
    assert (meta["p"]["reencoded"], meta["c"]["reencoded"]) == ("progressive JPEG", None)


def _pil_bytes(pixels: np.ndarray, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **params)
    return buffer.getvalue()


# ---------------------------------------------------------------- command line


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data.convert", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for text in ("imagenet-val-flat", "--resize-shorter", "Resume", "ILSVRC2012_ID"):
        assert text in result.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-src", "the following arguments are required: --src"),
        ("missing-dir", "is not a directory"),
        ("label-count", "--val-labels has 5 labels but --src holds 6"),
        ("bad-number", "samples_per_shard must be an int >= 1"),
        ("bad-type", "invalid int value"),
    ],
)
def test_cli_errors(
    tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    out = ["--out", str(tmp_path / "out")]
    short_labels = tmp_path / "labels.txt"
    short_labels.write_text("".join(f"{i}\n" for i in VAL_IDS[:5]))
    argv = {
        "no-src": out,
        "missing-dir": ["--src", str(tmp_path / "nowhere"), *out],
        "label-count": [
            "--src",
            tree.val,
            *out,
            "--val-labels",
            str(short_labels),
            "--synsets",
            tree.synsets,
        ],  # fmt: skip
        "bad-number": ["--src", tree.train, *out, "--samples-per-shard", "0"],
        "bad-type": ["--src", tree.train, *out, "--seed", "x"],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m data.convert: error: ")
    assert message in err
    assert not (tmp_path / "out" / MANIFEST).exists()
