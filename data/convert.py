"""Convert ImageNet (ILSVRC2012) or any ImageFolder tree into WebDataset shards.

Layouts (--layout; "auto" picks one from what --src holds):
  imagenet-train     wnid folders: SRC/<wnid>/*.JPEG, e.g. ILSVRC2012 train/ (or val/ sorted
                     into wnid folders). Class index = line of the wnid in --synsets when given,
                     else position of the wnid among the sorted folder names.
  imagenet-val-flat  SRC/ILSVRC2012_val_00000001.JPEG ... in one folder, labelled by
                     --val-labels and --synsets (both required).
  imagefolder        SRC/<class>/**/<image>, any depth; classes sorted by folder name (Python
                     string order) give the indices 0, 1, ...
  Files whose names end in .jpg .jpeg .png .bmp .gif .ppm .pgm .tif .tiff .webp (any case) are
  images; hidden files and folders are ignored.

Text formats:
  --synsets    one class per non-empty line, "wnid" or "wnid human readable name", in class-index
               order: the first line is class 0. This fits LOC_synset_mapping.txt and Caffe's
               synset_words.txt ("n01440764 tench, Tinca tinca") and synsets.txt ("n01440764").
  --val-labels one label per non-empty line; line N labels ILSVRC2012_val_{N:08d}. A label is a
               1-based ILSVRC2012_ID (the number of a line of --synsets), as in the devkit's
               ILSVRC2012_validation_ground_truth.txt, or a wnid.
  Caution: the devkit's IDs count in meta.mat's order (ID 1 = n02119789, kit fox), NOT in the
  sorted-wnid order of LOC_synset_mapping.txt. To decode them, give --synsets in meta.mat's order,
  and give the same --synsets file when converting train so both splits share class indices.

Each sample of a shard has the members
  KEY.jpg   a baseline RGB JPEG: the source bytes when the source already is one, else the image
            decoded (CMYK, grayscale, progressive, PNG behind a .JPEG name, ...) and re-encoded
            as RGB at --quality (4:2:0); with --resize-shorter, every image is re-encoded with
            its shorter side rescaled (bicubic) to that size, as the paper prepares ImageNet.
  KEY.cls   the class index, ASCII decimal.
  KEY.json  {"cls", "wnid", "name", "width", "height", "source", "reencoded"}: width/height of
            the source image, source path relative to --src, why it was re-encoded (or null).
  KEY is the source file name without extension, with characters other than [A-Za-z0-9_-]
  replaced by "_"; names that still collide use the relative path (plus a hash if need be).
Files that neither simplejpeg nor PIL can decode are skipped and listed in the manifest.

Shard assignment is a pure function of (file list, seed, samples per shard): the source files
are ordered by sha256("{seed}:{path relative to --src}") and cut into runs of
--samples-per-shard files (or, with --shard-size-mb, runs whose source bytes stay within that
size). Shard i is OUT/{prefix}-{i:06d}.tar. Skipped files keep their slot, so a shard may hold
fewer samples. The output depends neither on --workers nor on the order files are listed in.

Resume: each finished shard gets a sidecar OUT/{shard}.done.json holding its sha256 and a
fingerprint of what went into it (files, keys, labels, --resize-shorter, --quality). Re-running
the same command keeps every shard whose sidecar fingerprint matches and whose bytes still hash
to the recorded sha256, and rebuilds the rest (missing, half-written, corrupt or stale). Shards
are written under a temporary name and renamed into place, so a kill never leaves a partial shard
under a final name. OUT/manifest.json is removed when a run starts and written last, atomically:
its presence means the conversion is complete. Run one conversion per --out at a time; give
each split (prefix) its own --out.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image

from data.shards import looks_like_image, write_shard
from data.transforms import decode_rgb

__all__ = [
    "LAYOUTS",
    "ConvertError",
    "ConvertOptions",
    "convert",
    "main",
    "read_synsets",
    "read_val_labels",
]

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "imagenet-train", "imagenet-val-flat", "imagefolder")
MANIFEST = "manifest.json"
DONE_SUFFIX = ".done.json"  # per-shard sidecar: OUT/{prefix}-000000.tar.done.json
FORMAT = "alexnet-towers/convert/1"  # bump when the bytes written for the same input change
DEFAULT_SAMPLES_PER_SHARD = 1000  # ~110 MB of original ImageNet JPEGs, ~25 MB at 256

IMAGE_EXTENSIONS = tuple(".jpg .jpeg .png .bmp .gif .ppm .pgm .tif .tiff .webp".split())
_WNID = re.compile(r"n\d{8}")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")  # the stem of a flat validation file
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# " <_io.BytesIO object at 0x7f...>" in PIL's messages: dropped, so reasons repeat across runs
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_SPLIT_FOLDERS = {"train", "val", "test"}  # --src one level too high, in auto mode
_SUBSAMPLING = "420"  # chroma subsampling of re-encoded JPEGs, libjpeg's default
_PROGRESS_TTY_S, _PROGRESS_LOG_S = 0.25, 10.0  # progress redraw on a terminal / new line in logs


class ConvertError(ValueError):
    """Bad arguments or input: the command line prints the message as one line and exits 2."""


# ---------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Everything :func:`convert` needs besides ``src`` and ``out``; validated on construction."""

    layout: str = "auto"
    """One of :data:`LAYOUTS`; "auto" picks from --src's contents (module docstring)."""
    prefix: str = "train"
    """Shard names are ``{prefix}-{000000..}.tar``: letters, digits, ``_``, ``-``, ``.``."""
    samples_per_shard: int | None = None
    """Source files per shard; default 1000 unless ``shard_size_mb`` is given."""
    shard_size_mb: float | None = None
    """Instead of a count: cut shards when their source files reach this many MB (10**6)."""
    seed: int = 0
    """Seed of the shuffle of files across shards."""
    resize_shorter: int | None = None
    """Re-encode every image with its shorter side rescaled to this (the paper: 256)."""
    quality: int = 90
    """JPEG quality of re-encoded images."""
    workers: int | None = None
    """Worker processes; default ``os.cpu_count()``; 1 converts in this process."""
    val_labels: str | None = None
    """Ground-truth file of the flat validation layout (module docstring)."""
    synsets: str | None = None
    """Class list ``wnid [name]`` per line in index order (module docstring)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConvertError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.prefix):
            raise ConvertError(
                f"prefix must be letters, digits, '_', '-', '.' (not first), got {self.prefix!r}"
            )
        if self.samples_per_shard is not None and self.shard_size_mb is not None:
            raise ConvertError("give samples_per_shard or shard_size_mb, not both")
        _check_int("samples_per_shard", self.samples_per_shard, 1, optional=True)
        if self.shard_size_mb is not None and not self.shard_size_mb > 0:
            raise ConvertError(f"shard_size_mb must be > 0, got {self.shard_size_mb!r}")
        _check_int("seed", self.seed, 0)
        _check_int("resize_shorter", self.resize_shorter, 1, optional=True)
        _check_int("quality", self.quality, 1, maximum=100)
        _check_int("workers", self.workers, 1, optional=True)

    @property
    def shard_limit(self) -> tuple[int | None, int | None]:
        """(files per shard, source bytes per shard): exactly one is set."""
        if self.shard_size_mb is not None:
            return None, int(self.shard_size_mb * 1e6)
        return self.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD, None


def _check_int(
    name: str, value: object, minimum: int, maximum: int | None = None, optional: bool = False
) -> None:
    """Raise a ConvertError naming ``name`` unless ``value`` is an int in range (or None)."""
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConvertError(f"{name} must be an int {allowed}, got {value!r}")


# ---------------------------------------------------------------- label files


def read_synsets(path: str) -> list[tuple[str, str | None]]:
    """``[(wnid, name or None), ...]`` from a synset file, in class-index order."""
    synsets: list[tuple[str, str | None]] = []
    seen: dict[str, int] = {}
    for lineno, line in _read_lines(path, "--synsets"):
        wnid, *rest = line.split(maxsplit=1)
        if not _WNID.fullmatch(wnid):
            raise ConvertError(f"{path}:{lineno}: expected 'wnid [name]', got {line[:60]!r}")
        if wnid in seen:
            raise ConvertError(f"{path}:{lineno}: {wnid} repeats line {seen[wnid]}")
        seen[wnid] = lineno
        synsets.append((wnid, rest[0] if rest else None))
    if not synsets:
        raise ConvertError(f"--synsets {path} holds no classes")
    return synsets


def read_val_labels(path: str, synsets: list[tuple[str, str | None]]) -> list[int]:
    """0-based class indices, one per label line (1-based ILSVRC2012_IDs or wnids)."""
    index = {wnid: i for i, (wnid, _) in enumerate(synsets)}
    labels, used_ids = [], False
    for lineno, line in _read_lines(path, "--val-labels"):
        if line.isdigit() and 1 <= int(line) <= len(synsets):
            labels.append(int(line) - 1)
            used_ids = True
        elif line in index:
            labels.append(index[line])
        else:
            raise ConvertError(
                f"{path}:{lineno}: {line[:30]!r} is neither an ID in 1..{len(synsets)} "
                "nor a wnid of --synsets"
            )
    wnids = [wnid for wnid, _ in synsets]
    if used_ids and len(wnids) == 1000 and wnids == sorted(wnids):
        log.warning(
            "--synsets is in sorted-wnid order, but the devkit's ILSVRC2012_IDs follow meta.mat's "
            "order (ID 1 = n02119789): the validation labels are probably wrong"
        )
    return labels


def _read_lines(path: str, flag: str) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the non-empty lines of a text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConvertError(f"{flag} {path}: cannot read it ({err})") from err


# ---------------------------------------------------------------- discovery


@dataclasses.dataclass(frozen=True)
class _Discovery:
    """What --src holds: the layout, the classes and the files to convert."""

    layout: str
    classes: list[tuple[str | None, str | None]]  # class index → (wnid, name)
    sources: list[tuple[str, int]]  # (path relative to src, class index), sorted by path
    skipped: list[dict]  # files refused before conversion: {"path", "reason"}


def _discover(src: str, options: ConvertOptions) -> _Discovery:
    """List the classes and image files of ``src`` in its layout."""
    layout = _detect_layout(src) if options.layout == "auto" else options.layout
    if layout != "imagenet-val-flat" and options.val_labels:
        raise ConvertError(f"--val-labels applies to the imagenet-val-flat layout, not {layout}")
    if layout == "imagenet-val-flat":
        return _discover_val_flat(src, options)
    folders = _class_folders(src)
    if not folders:
        raise ConvertError(f"--src {src} has no class folders for the {layout} layout")
    if layout == "imagefolder":
        if options.synsets:
            raise ConvertError("--synsets applies to the ImageNet layouts, not imagefolder")
        classes = [(None, folder) for folder in folders]
        index = {folder: i for i, folder in enumerate(folders)}
    else:
        classes = _wnid_classes(src, folders, options.synsets)
        index = {wnid: i for i, (wnid, _) in enumerate(classes)}
    sources = [(rel, index[folder]) for folder in folders for rel in _list_images(src, folder)]
    sources.sort()
    return _Discovery(layout, classes, sources, skipped=[])


def _detect_layout(src: str) -> str:
    """The layout of ``src`` judged from its top level (module docstring)."""
    folders = _class_folders(src)
    if folders and all(_WNID.fullmatch(f) for f in folders):
        return "imagenet-train"
    if folders and set(folders) <= _SPLIT_FOLDERS:
        raise ConvertError(f"--src {src} holds {', '.join(folders)}: point it at one split")
    if folders:
        return "imagefolder"
    if any(_VAL_NAME.fullmatch(os.path.splitext(n)[0]) for n in os.listdir(src)):
        return "imagenet-val-flat"
    raise ConvertError(f"--src {src} holds neither class folders nor ILSVRC2012_val_* images")


def _class_folders(src: str) -> list[str]:
    """Sorted names of the non-hidden folders directly inside ``src``."""
    return sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))


def _wnid_classes(
    src: str, folders: list[str], synsets_path: str | None
) -> list[tuple[str | None, str | None]]:
    """Classes of the imagenet-train layout: --synsets order if given, else sorted folders."""
    not_wnids = [f for f in folders if not _WNID.fullmatch(f)]
    if not_wnids:
        raise ConvertError(
            f"--src {src}: {len(not_wnids)} folders are not wnids (e.g. {not_wnids[0]!r}); "
            "use --layout imagefolder"
        )
    if not synsets_path:
        return [(wnid, None) for wnid in folders]
    synsets = read_synsets(synsets_path)
    known = {wnid for wnid, _ in synsets}
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise ConvertError(
            f"--src {src}: {len(unknown)} wnid folders are not in --synsets (e.g. {unknown[0]})"
        )
    return list(synsets)


def _list_images(src: str, folder: str) -> list[str]:
    """Paths relative to ``src`` ('/'-separated) of the images anywhere under ``src/folder``."""
    found = []
    for root, dirs, files in os.walk(os.path.join(src, folder), followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, src).replace(os.sep, "/")
        found += [f"{rel_root}/{name}" for name in sorted(files) if _is_image_name(name)]
    if not found:
        log.warning("class folder %s holds no images", os.path.join(src, folder))
    return found


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _discover_val_flat(src: str, options: ConvertOptions) -> _Discovery:
    """The flat validation folder: image N gets line N of --val-labels."""
    if not options.val_labels or not options.synsets:
        raise ConvertError("the imagenet-val-flat layout needs --val-labels and --synsets")
    synsets = read_synsets(options.synsets)
    labels = read_val_labels(options.val_labels, synsets)
    numbered: dict[int, str] = {}
    skipped = []
    for name in sorted(n for n in os.listdir(src) if _is_image_name(n)):
        match = _VAL_NAME.fullmatch(os.path.splitext(name)[0])
        if not match:
            skipped.append({"path": name, "reason": "not named ILSVRC2012_val_NNNNNNNN"})
            continue
        number = int(match.group(1))
        if number in numbered:
            raise ConvertError(
                f"--src {src}: {numbered[number]} and {name} are both image {number}"
            )
        numbered[number] = name
    if len(numbered) != len(labels) or (numbered and max(numbered) > len(labels)):
        raise ConvertError(
            f"--val-labels has {len(labels)} labels but --src holds {len(numbered)} "
            f"ILSVRC2012_val_* images (numbered up to {max(numbered, default=0)}); "
            "each image N needs line N"
        )
    sources = sorted((name, labels[n - 1]) for n, name in numbered.items())
    return _Discovery("imagenet-val-flat", list(synsets), sources, skipped)


def _keys(paths: list[str]) -> list[str]:
    """Unique, tar-safe sample keys: the file stem, else the relative path, else path + hash."""

    def safe(text: str) -> str:
        return _UNSAFE_KEY_CHARS.sub("_", text) or "_"

    keys = [safe(os.path.splitext(os.path.basename(p))[0]) for p in paths]
    for fallback in (
        lambda p: safe(os.path.splitext(p)[0]),
        lambda p: safe(os.path.splitext(p)[0]) + "_" + hashlib.sha1(p.encode()).hexdigest()[:10],
    ):
        counts = collections.Counter(keys)
        keys = [fallback(p) if counts[k] > 1 else k for p, k in zip(paths, keys, strict=True)]
    return keys


# ---------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every shard of one conversion shares."""

    src: str
    out: str
    resize_shorter: int | None
    quality: int
    classes: tuple[tuple[str | None, str | None], ...]  # class index → (wnid, name)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One shard to make: its name, its files and the fingerprint that its sidecar must match."""

    index: int
    name: str
    entries: tuple[tuple[str, str, int], ...]  # (path relative to src, key, class index)
    fingerprint: str


def _plan(discovery: _Discovery, job: _Job, options: ConvertOptions) -> list[_Shard]:
    """Cut the shuffled files into shards: a pure function of (files, seed, shard limit)."""
    paths = [rel for rel, _ in discovery.sources]
    keys = _keys(paths)
    order = sorted(range(len(paths)), key=lambda i: _shuffle_rank(options.seed, paths[i]))
    per_shard, max_bytes = options.shard_limit
    runs: list[list[int]] = [[]]
    run_bytes = 0
    for i in order:
        size = _file_size(os.path.join(job.src, paths[i])) if max_bytes else 0
        full = len(runs[-1]) == per_shard if per_shard else run_bytes + size > max_bytes
        if runs[-1] and full:
            runs.append([])
            run_bytes = 0
        runs[-1].append(i)
        run_bytes += size
    shards = []
    for n, run in enumerate(runs):
        entries = tuple((paths[i], keys[i], discovery.sources[i][1]) for i in run)
        name = f"{options.prefix}-{n:06d}.tar"
        shards.append(_Shard(n, name, entries, _fingerprint(name, entries, job)))
    return shards


def _file_size(path: str) -> int:
    """Bytes in ``path``; 0 if it cannot be read (its shard then lists it as skipped)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _shuffle_rank(seed: int, rel: str) -> bytes:
    return hashlib.sha256(f"{seed}:{rel}".encode()).digest()


def _fingerprint(name: str, entries: tuple[tuple[str, str, int], ...], job: _Job) -> str:
    """Hash of everything that decides a shard's bytes (except the source files' contents)."""
    what = {
        "format": FORMAT,
        "name": name,
        "resize_shorter": job.resize_shorter,
        "quality": job.quality,
        "entries": [[rel, key, cls, *job.classes[cls]] for rel, key, cls in entries],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- one image


class _Unreadable(Exception):
    """A source file that cannot be read or decoded; the message is the reason."""


def _convert_file(
    path: str, resize_shorter: int | None, quality: int
) -> tuple[bytes, int, int, str | None]:
    """``(jpg, width, height, why re-encoded or None)`` for one source file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise _Unreadable(f"cannot read file: {err.strerror or err}") from err
    if not data:
        raise _Unreadable("empty file")
    try:
        pixels = decode_rgb(data)  # (H, W, 3); a full decode also proves the bytes are whole
    except ValueError as err:  # the reason, without PIL's run-dependent object addresses
        raise _Unreadable(_OBJECT_REPR.sub("", str(err))) from err
    height, width = pixels.shape[:2]
    why = _why_reencode(data)
    if resize_shorter and min(width, height) != resize_shorter:
        pixels = _resize_shorter(pixels, resize_shorter)
        why = "resized" if why is None else f"{why}, resized"
    if why is None:
        return data, width, height, None
    jpg = simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels),
        quality=quality,
        colorspace="RGB",
        colorsubsampling=_SUBSAMPLING,
    )
    return jpg, width, height, why


def _why_reencode(data: bytes) -> str | None:
    """None when ``data`` is a baseline, 3-channel JPEG that both decoders read; else why not."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode, progressive = image.format, image.mode, bool(image.info.get("progressive"))
    except Exception:  # PIL raises many types; decode_rgb read it, so simplejpeg did
        return "JPEG that PIL cannot parse"
    if fmt != "JPEG":
        return f"{fmt} image"
    if mode != "RGB":
        return "grayscale JPEG" if mode == "L" else f"{mode} JPEG"
    if progressive:
        return "progressive JPEG"
    try:
        simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return "JPEG that libjpeg-turbo cannot parse"
    if not looks_like_image(data):
        return "data after the JPEG end marker"
    return None


def _resize_shorter(pixels: np.ndarray, shorter: int) -> np.ndarray:
    """(H, W, 3) → (H', W', 3) with min(H', W') = ``shorter``, aspect kept (bicubic)."""
    height, width = pixels.shape[:2]
    if width <= height:
        size = (shorter, max(1, round(height * shorter / width)))  # PIL sizes are (w, h)
    else:
        size = (max(1, round(width * shorter / height)), shorter)
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))


# ---------------------------------------------------------------- one shard


def _run_shard(job: _Job, shard: _Shard, tick: Callable[[], None]) -> dict:
    """Keep a finished shard whose sidecar and sha256 check out, else build it; its record."""
    path = os.path.join(job.out, shard.name)
    record = _finished_record(path, shard.fingerprint)
    if record is not None:
        return dict(record, reused=True)
    _remove(path + DONE_SUFFIX)  # stale: the shard is rebuilt below
    samples, skipped = [], []
    class_counts: collections.Counter = collections.Counter()
    for rel, key, cls in shard.entries:
        try:
            jpg, width, height, why = _convert_file(
                os.path.join(job.src, rel), job.resize_shorter, job.quality
            )
        except _Unreadable as err:
            skipped.append({"path": rel, "reason": str(err)})
            log.warning("skipped %s: %s", rel, err)
        else:
            wnid, name = job.classes[cls]
            meta = {
                "cls": cls,
                "wnid": wnid,
                "name": name,
                "width": width,
                "height": height,
                "source": rel,
                "reencoded": why,
            }
            samples.append((key, jpg, cls, {"json": json.dumps(meta, sort_keys=True).encode()}))
            class_counts[cls] += 1
        tick()
    write_shard(samples, path)
    record = {
        "shard": shard.name,
        "samples": len(samples),
        "bytes": os.path.getsize(path),
        "sha256": _sha256_file(path),
        "fingerprint": shard.fingerprint,
        "class_counts": {str(c): n for c, n in sorted(class_counts.items())},
        "skipped": skipped,
    }
    _write_json_atomic(path + DONE_SUFFIX, record)
    return dict(record, reused=False)


def _finished_record(path: str, fingerprint: str) -> dict | None:
    """The sidecar record of ``path`` if it matches ``fingerprint`` and the file's sha256."""
    try:
        with open(path + DONE_SUFFIX) as f:
            record = json.load(f)
        if record["fingerprint"] != fingerprint or os.path.getsize(path) != record["bytes"]:
            return None
        return record if _sha256_file(path) == record["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: str, obj: object) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it into place."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- all shards

_counter = None  # a worker's handle on the shared count of converted files


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _tick_shared() -> None:
    with _counter.get_lock():
        _counter.value += 1


def _pool_run_shard(job: _Job, shard: _Shard) -> dict:
    return _run_shard(job, shard, _tick_shared)


class _Progress:
    """One progress line on stderr: redrawn in place at most 4×/s on a terminal, else a new
    line every 10 s. Counts source files: done / total, the rate of this run and the ETA."""

    def __init__(self, label: str, total: int, shards: int, enabled: bool) -> None:
        self.label, self.total, self.shards, self.enabled = label, total, shards, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.interval = _PROGRESS_TTY_S if self.tty else _PROGRESS_LOG_S
        self.start = self.last = time.monotonic()

    def update(self, converted: int, reused: int, shards_done: int, final: bool = False) -> None:
        """Show ``converted`` files made this run plus ``reused`` files found done."""
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.interval):
            return
        self.last = now
        rate = converted / max(now - self.start, 1e-9)
        left = self.total - converted - reused
        eta = _hms(left / rate) if rate > 0 else "?"
        line = (
            f"{self.label}: {converted + reused}/{self.total} images "
            f"({100 * (converted + reused) / max(self.total, 1):.1f}%), {rate:.1f} img/s, "
            f"ETA {eta}, shards {shards_done}/{self.shards}"
        )
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r" + line + "\x1b[K" if self.tty else line) + end)
        sys.stderr.flush()


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_all(job: _Job, shards: list[_Shard], workers: int, progress: _Progress) -> list[dict]:
    """Run every shard, in this process or a pool of ``workers``; the records in shard order."""
    records: dict[int, dict] = {}
    reused_files = 0

    def finish(shard: _Shard, record: dict) -> None:
        nonlocal reused_files
        records[shard.index] = record
        if record["reused"]:
            reused_files += len(shard.entries)

    if workers <= 1:
        converted = [0]

        def tick() -> None:
            converted[0] += 1
            progress.update(converted[0], reused_files, len(records))

        for shard in shards:
            finish(shard, _run_shard(job, shard, tick))
        progress.update(converted[0], reused_files, len(records), final=True)
        return [records[s.index] for s in shards]

    ctx = multiprocessing.get_context()
    counter = ctx.Value("q", 0)
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)
    )
    try:
        pending = {pool.submit(_pool_run_shard, job, shard): shard for shard in shards}
        while pending:
            done, _ = concurrent.futures.wait(
                pending, timeout=_PROGRESS_TTY_S, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                finish(pending.pop(future), future.result())
            progress.update(counter.value, reused_files, len(records))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running shards finish, the rest wait
        raise
    pool.shutdown()
    progress.update(counter.value, reused_files, len(records), final=True)
    return [records[s.index] for s in shards]


# ---------------------------------------------------------------- the output folder


def _prepare_out(out: str, prefix: str, num_shards: int) -> None:
    """Make ``out``, drop the old manifest, leftover temporary files and surplus shards."""
    os.makedirs(out, exist_ok=True)
    manifest = os.path.join(out, MANIFEST)
    try:
        with open(manifest) as f:
            old_prefix = json.load(f).get("prefix")
    except (OSError, ValueError, AttributeError):
        old_prefix = prefix
    if old_prefix != prefix:
        raise ConvertError(
            f"--out {out} holds the {old_prefix!r} conversion; give each prefix its own --out"
        )
    _remove(manifest)  # written again, last, once every shard is done
    done = re.escape(DONE_SUFFIX)
    mine = re.compile(rf"\.?{re.escape(prefix)}-(\d{{6}})\.tar(?:{done})?(\.tmp-\d+)?")
    for name in sorted(os.listdir(out)):
        match = mine.fullmatch(name)
        is_tmp = name.startswith(".") and match and match.group(2)
        surplus = not name.startswith(".") and match and int(match.group(1)) >= num_shards
        if is_tmp or surplus:
            log.info("removing %s from %s", "leftover" if is_tmp else "surplus", name)
            _remove(os.path.join(out, name))
    for name in os.listdir(out):
        if name.startswith(f".{MANIFEST}.tmp-"):
            _remove(os.path.join(out, name))


def _manifest(
    src: str,
    discovery: _Discovery,
    options: ConvertOptions,
    shards: list[_Shard],
    records: list[dict],
) -> dict:
    """The description of a finished conversion (written as OUT/manifest.json)."""
    class_counts: collections.Counter = collections.Counter()
    skipped = list(discovery.skipped)
    for record in records:
        class_counts.update({int(c): n for c, n in record["class_counts"].items()})
        skipped += record["skipped"]
    return {
        "format": FORMAT,
        "layout": discovery.layout,
        "src": src,
        "prefix": options.prefix,
        "pattern": f"{options.prefix}-{{000000..{len(shards) - 1:06d}}}.tar",
        "options": {
            "seed": options.seed,
            "samples_per_shard": options.shard_limit[0],
            "shard_size_mb": options.shard_size_mb,
            "resize_shorter": options.resize_shorter,
            "quality": options.quality,
            "synsets": options.synsets and os.path.abspath(options.synsets),
            "val_labels": options.val_labels and os.path.abspath(options.val_labels),
        },
        "source_files": len(discovery.sources) + len(discovery.skipped),
        "total_samples": sum(r["samples"] for r in records),
        "shards": [{k: r[k] for k in ("shard", "samples", "bytes", "sha256")} for r in records],
        "classes": [
            {"index": i, "wnid": wnid, "name": name, "samples": class_counts[i]}
            for i, (wnid, name) in enumerate(discovery.classes)
        ],
        "skipped": sorted(skipped, key=lambda s: s["path"]),
    }


# ---------------------------------------------------------------- API


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str = "auto",
    prefix: str = "train",
    samples_per_shard: int | None = None,
    shard_size_mb: float | None = None,
    seed: int = 0,
    resize_shorter: int | None = None,
    quality: int = 90,
    workers: int | None = None,
    val_labels: str | None = None,
    synsets: str | None = None,
    progress: bool = False,
) -> dict:
    """Convert the images under ``src`` into shards in ``out``; return the manifest.

    The options are those of :class:`ConvertOptions` and the command line (module docstring);
    ``progress`` shows the progress line on stderr. Running it again with the same arguments
    keeps the shards that are already done (module docstring, "Resume").

    Raises:
        ConvertError: bad options, a missing or unsuitable ``src``, inconsistent label files.
    """
    opts = ConvertOptions(
        layout=layout,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        shard_size_mb=shard_size_mb,
        seed=seed,
        resize_shorter=resize_shorter,
        quality=quality,
        workers=workers,
        val_labels=val_labels and os.fspath(val_labels),
        synsets=synsets and os.fspath(synsets),
    )
    src, out = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(out))
    if not os.path.isdir(src):
        raise ConvertError(f"--src {src} is not a directory")
    if os.path.commonpath([src, out]) == src:
        raise ConvertError(f"--out {out} must not be inside --src {src}")
    start = time.monotonic()

    # Plan: which files, which labels, which shard each file goes to.
    discovery = _discover(src, opts)
    if not discovery.sources:
        raise ConvertError(f"--src {src} holds no images for the {discovery.layout} layout")
    job = _Job(src, out, opts.resize_shorter, opts.quality, tuple(discovery.classes))
    shards = _plan(discovery, job, opts)
    log.info(
        "%s: %d files of %d classes (%s) → %d shards in %s",
        *(opts.prefix, len(discovery.sources), len(discovery.classes), discovery.layout),
        *(len(shards), out),
    )

    # Convert: every shard not already finished.
    _prepare_out(out, opts.prefix, len(shards))
    workers = min(opts.workers or os.cpu_count() or 1, len(shards))
    bar = _Progress(opts.prefix, len(discovery.sources), len(shards), progress)
    records = _run_all(job, shards, workers, bar)

    # Publish: the manifest, last.
    manifest = _manifest(src, discovery, opts, shards, records)
    _write_json_atomic(os.path.join(out, MANIFEST), manifest)
    reused = sum(r["reused"] for r in records)
    skipped, elapsed = len(manifest["skipped"]), time.monotonic() - start
    log.info(
        "%s: %d samples in %d shards (%d reused), skipped files: %d, %.1f s",
        *(opts.prefix, manifest["total_samples"], len(shards), reused, skipped, elapsed),
    )
    return manifest


# ---------------------------------------------------------------- command line


_EXAMPLES = """examples:
  # train, the paper's 256 preprocessing, class indices from a synset file
  python -m data.convert --src ILSVRC2012/train --out wds/train --prefix train \\
      --resize-shorter 256 --synsets synsets_metamat.txt
  # the flat validation folder, labelled by the devkit's ground truth (same synset file!)
  python -m data.convert --src ILSVRC2012/val --out wds/val --prefix val --resize-shorter 256 \\
      --val-labels ILSVRC2012_validation_ground_truth.txt --synsets synsets_metamat.txt
  # any ImageFolder tree
  python -m data.convert --src flowers/ --out wds/flowers --samples-per-shard 500
Re-run the same command to resume after an interruption.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        one_line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {one_line} (see --help)\n")


def _parser() -> _Parser:
    parser = _Parser(
        prog="python -m data.convert",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--src", required=True, metavar="DIR", help="folder of source images (one split)")
    add("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    add("--layout", choices=LAYOUTS, default="auto", help="source layout (default: auto)")
    add("--prefix", default="train", help="shard name prefix (default: train)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--samples-per-shard",
        type=int,
        metavar="N",
        help=f"source files per shard (default: {DEFAULT_SAMPLES_PER_SHARD})",
    )
    size.add_argument(
        "--shard-size-mb",
        type=float,
        metavar="MB",
        help="instead: cut shards at this many MB of source files",
    )
    add(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the shuffle across shards (default: 0)",
    )
    add(
        "--resize-shorter",
        type=int,
        metavar="PIXELS",
        help="re-encode all images with the shorter side rescaled to PIXELS (the paper: 256); "
        "default: keep the original bytes",
    )
    add(
        "--quality",
        type=int,
        default=90,
        metavar="Q",
        help="JPEG quality of re-encoded images (default: 90)",
    )
    add(
        "--workers", type=int, default=None, metavar="N", help="processes (default: os.cpu_count())"
    )
    add("--val-labels", default=None, metavar="FILE", help="ground truth of the flat val layout")
    add("--synsets", default=None, metavar="FILE", help="'wnid [name]' per line, index order")
    add("--quiet", action="store_true", help="no progress line, warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m data.convert``: see the module docstring or ``--help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        options = {k: v for k, v in vars(args).items() if k not in ("src", "out", "quiet")}
        manifest = convert(args.src, args.out, progress=not args.quiet, **options)
    except ConvertError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    pattern = os.path.join(os.path.abspath(args.out), manifest["pattern"])
    print(f"{manifest['total_samples']} samples in {len(manifest['shards'])} shards: {pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
