"""WebDataset tar shards: write them atomically, name them by pattern, read them back safely.

A shard is a plain (uncompressed) tar file in the WebDataset layout: the members of one sample
share a key and differ by extension, here ``{key}.jpg`` (encoded image bytes) and ``{key}.cls``
(the class index as ASCII decimal), plus any extra members a writer adds (e.g. ``{key}.json``),
which readers here ignore. Shards are named ``{prefix}-{000000..}.tar``.

Reading never crashes on bad data and never yields a wrong label: a sample whose tar members are
corrupt, that lacks ``jpg`` or ``cls``, whose ``cls`` is not a non-negative integer, or whose
image bytes are not a recognisable image is skipped, logged and counted in a :class:`ReadStats`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping

import simplejpeg
from PIL import Image

__all__ = [
    "ReadStats",
    "TarBreak",
    "TarSamples",
    "expand_shards",
    "looks_like_image",
    "read_samples",
    "write_shard",
    "write_shards",
]

log = logging.getLogger(__name__)

_JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker and the first byte of the next marker
_JPEG_EOI = b"\xff\xd9"  # end-of-image marker
_EOI_SEARCH_BYTES = 4096  # tolerate a little padding after EOI, as some encoders leave
_IMAGE_SUFFIXES = ("jpg", "jpeg")  # accepted names of the image member
_RESERVED_MEMBERS = (*_IMAGE_SUFFIXES, "cls")  # names that extra members may not take

# One sample to write: (key, jpg, cls), or (key, jpg, cls, extra) where extra maps further member
# extensions to their bytes, e.g. {"json": b'{"wnid": "n01440764"}'}.
Sample = tuple[str, bytes, int] | tuple[str, bytes, int, Mapping[str, bytes]]
_Checked = tuple[str, bytes, int, dict[str, bytes]]  # a validated sample, extra always present


# ---------------------------------------------------------------- writing


def write_shards(
    samples: Iterable[Sample],
    out_dir: str,
    prefix: str,
    samples_per_shard: int,
) -> list[str]:
    """Write ``(key, jpg, cls)`` samples into ``{out_dir}/{prefix}-{000000..}.tar``.

    Each shard is written under a hidden temporary name and renamed into place once complete,
    so a crash never leaves a half-written shard under a final name. Member times are fixed
    (mtime 0), so the same samples always give byte-identical shards.

    Args:
        samples: ``(key, jpg, cls)`` triples, or ``(key, jpg, cls, extra)`` where ``extra``
            maps further member extensions to bytes (written as ``{key}.{ext}``); ``key`` must
            be unique, non-empty and contain no ``.`` (WebDataset splits the key from the
            extension at the first dot) nor ``/``.
        out_dir: Directory for the shards; created if missing.
        prefix: Shard name prefix, e.g. ``"train"``.
        samples_per_shard: Samples per shard (the last shard may hold fewer).

    Returns:
        The written shard paths, in order. Empty when ``samples`` is empty.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    batch: list[_Checked] = []
    for sample in samples:
        batch.append(_checked_sample(sample))
        if len(batch) == samples_per_shard:
            name = f"{prefix}-{len(paths):06d}.tar"
            paths.append(_write_one_shard(batch, os.path.join(out_dir, name)))
            batch = []
    if batch:
        name = f"{prefix}-{len(paths):06d}.tar"
        paths.append(_write_one_shard(batch, os.path.join(out_dir, name)))
    return paths


def write_shard(samples: Iterable[Sample], path: str) -> str:
    """Write all ``samples`` into the one shard ``path``, atomically (see :func:`write_shards`).

    ``samples`` take the same forms as in :func:`write_shards`; none at all gives an empty
    (but valid) tar. The parent directory must exist. Returns ``path``.
    """
    return _write_one_shard([_checked_sample(s) for s in samples], path)


def _checked_sample(sample: Sample) -> _Checked:
    """Validate one ``(key, jpg, cls[, extra])`` sample before it is written."""
    if len(sample) not in (3, 4):
        raise ValueError(f"a sample is (key, jpg, cls[, extra]), got {len(sample)} fields")
    key, jpg, cls = sample[:3]
    extra = sample[3] if len(sample) == 4 else {}
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    if not isinstance(jpg, (bytes, bytearray, memoryview)):
        raise ValueError(f"sample {key!r}: jpg must be bytes, got {type(jpg).__name__}")
    if isinstance(cls, bool) or not isinstance(cls, int) or cls < 0:
        raise ValueError(f"sample {key!r}: cls must be an int >= 0, got {cls!r}")
    for ext, data in extra.items():
        if not ext or ext.startswith("_") or "/" in ext or ext.lower() in _RESERVED_MEMBERS:
            raise ValueError(f"sample {key!r}: bad extra member name {ext!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {key!r}: extra member {ext!r} must be bytes")
    return key, bytes(jpg), cls, {ext: bytes(data) for ext, data in extra.items()}


def _write_one_shard(batch: list[_Checked], final: str) -> str:
    """Write ``batch`` to ``.{name}.tmp-<pid>`` beside ``final``, then rename it to ``final``."""
    import webdataset  # here, not at the top: it imports PyTorch, which reading shards never needs

    out_dir, name = os.path.split(final)
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as stream:
            with webdataset.TarWriter(stream, encoder=False, mtime=0) as writer:
                for key, jpg, cls, extra in batch:
                    cls_bytes = str(cls).encode("ascii")
                    writer.write({**extra, "__key__": key, "jpg": jpg, "cls": cls_bytes})
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


# ---------------------------------------------------------------- naming

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(pattern: str) -> list[str]:
    """Expand a shard pattern into the sorted list of existing, readable shard files.

    ``pattern`` is one of, or a comma-separated list of:

    - a brace range ``/x/train-{000000..000003}.tar`` (the width of the first bound sets the
      zero padding) or a brace list ``/x/{train,val}-000000.tar``; every name must exist;
    - a glob ``/x/train-*.tar``;
    - a directory (all ``*.tar`` files directly inside it);
    - a file path.

    Raises:
        ValueError: one line naming the pattern, when nothing matches or a file is missing or
            not readable.
    """
    parts = [p.strip() for p in _split_top_level_commas(pattern) if p.strip()]
    if not parts:
        raise ValueError(f"shard pattern {pattern!r} is empty")
    found: set[str] = set()
    for part in parts:
        part = os.path.expanduser(part)
        if "{" in part:
            names = _expand_braces(part, pattern)
        elif glob.has_magic(part):
            names = glob.glob(part)
        elif os.path.isdir(part):
            names = glob.glob(os.path.join(glob.escape(part), "*.tar"))
        else:
            names = [part]
        for name in names:
            if not os.path.isfile(name) or not os.access(name, os.R_OK):
                raise ValueError(f"shard pattern {pattern!r}: {name!r} is not a readable file")
        found.update(names)
    if not found:
        raise ValueError(f"shard pattern {pattern!r} matches no files")
    return sorted(found)


def _split_top_level_commas(text: str) -> list[str]:
    """Split on commas that are not inside ``{...}`` (those belong to brace lists)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_braces(text: str, pattern: str) -> list[str]:
    """Expand the first ``{a..b}`` or ``{x,y}`` group in ``text``, recursively."""
    open_at = text.find("{")
    if open_at < 0:
        return [text]
    close_at = text.find("}", open_at)
    if close_at < 0:
        raise ValueError(f"shard pattern {pattern!r} has an unclosed '{{'")
    head, body, tail = text[:open_at], text[open_at + 1 : close_at], text[close_at + 1 :]
    match = _BRACE_RANGE.fullmatch("{" + body + "}")
    if match:
        lo, hi = match.group(1), match.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"shard pattern {pattern!r} has an empty range {{{body}}}")
        choices = [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [name for c in choices for name in _expand_braces(head + c + tail, pattern)]


# ---------------------------------------------------------------- reading


@dataclasses.dataclass
class ReadStats:
    """Counts kept by :func:`read_samples`; pass one in to learn what was skipped."""

    samples: int = 0  # samples yielded
    skipped: int = 0  # samples dropped, plus one per shard whose rest could not be read
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, reason: str, key: str, path: str) -> None:
        """Count and log one skipped sample."""
        self.skipped += 1
        self.reasons[reason] += 1
        log.warning("skipped sample %r in %s: %s", key, path, reason)


def read_samples(
    paths: Iterable[str], stats: ReadStats | None = None
) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(key, jpg, cls)`` from the shards in ``paths``, in shard and member order.

    Bad samples are skipped, logged and counted in ``stats`` (see the module docstring). A shard
    that cannot be opened, or whose tar structure breaks part-way, loses the sample being read
    and everything after it in that shard; reading goes on with the next shard.

    Image bytes get a cheap structural check (:func:`looks_like_image`), not a full decode.
    """
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        yield from _read_one_shard(path, stats)


def _read_one_shard(path: str, stats: ReadStats) -> Iterator[tuple[str, bytes, int]]:
    """Yield the complete, valid samples of one shard (see :func:`read_samples`)."""
    samples = TarSamples(path, _add_member_bytes)
    for key, members in samples:
        sample = _complete_sample(key, members, path, stats)
        if sample is not None:
            yield sample
    broken = samples.broken
    if broken is None:
        return
    if broken.raised:  # the sample being read is lost with the rest
        reason = f"corrupt tar ({broken.reason}); rest of shard unreadable"
        stats.skip(reason, broken.key or "*", path)
        return
    if broken.key is not None:  # the tar itself ended cleanly: its last sample is whole
        sample = _complete_sample(broken.key, broken.members, path, stats)
        if sample is not None:
            yield sample
    stats.skip("tar broken part-way; rest of shard unreadable", "*", path)


def _add_member_bytes(
    members: dict, suffix: str, info: tarfile.TarInfo, read: Callable[[], bytes]
) -> None:
    """What :func:`read_samples` keeps of a member: all its bytes, the last one of a name wins."""
    members[suffix] = read()


@dataclasses.dataclass
class TarBreak:
    """Where and why a shard's tar structure broke (:attr:`TarSamples.broken`)."""

    reason: str  # tarfile's error, or "bad header part-way"
    raised: bool  # True: reading failed part-way; False: the tar ended, but not the file
    key: str | None  # the sample being read when it broke, or the last one; None: none yet
    members: dict  # what :class:`TarSamples`'s ``add`` made of that sample's members


class TarSamples:
    """The samples of one tar shard, grouped from its members: the one loop over tar members
    that both :func:`read_samples` and the loader's index scan use.

    Iterating yields ``(key, members)`` for each run of consecutive file members sharing a key
    (WebDataset's layout), in member order. ``members`` is a dict that ``add(members, suffix,
    info, read)`` fills from each member of the run: ``suffix`` is the lower-cased extension,
    ``info`` the ``tarfile.TarInfo``, ``read()`` returns the member's bytes. The caller decides
    which members it reads and how duplicates resolve.

    A sound shard yields every run. A broken one (unreadable, truncated, a corrupt header, or
    data other than zero padding after the tar's end, where ``tarfile`` stops quietly) yields
    the runs before the break and leaves the run it was reading, whole or not, in
    :attr:`broken`; the rest of the shard is lost. A member whose data runs past the end of the
    file counts as a break where it starts, even before anything reads it.
    """

    def __init__(
        self, path: str, add: Callable[[dict, str, tarfile.TarInfo, Callable[[], bytes]], None]
    ) -> None:
        self.path, self._add = path, add
        self.broken: TarBreak | None = None  # set once iteration has ended, if the tar broke

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        key: str | None = None
        members: dict = {}
        try:
            file_size = os.path.getsize(self.path)
            with tarfile.open(self.path, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    member_key, suffix = _split_member_name(info.name)
                    if member_key != key:
                        if key is not None:
                            yield key, members
                        key, members = member_key, {}
                    if info.offset_data + info.size > file_size:
                        raise tarfile.ReadError(f"member {info.name!r} runs past the file's end")
                    self._add(members, suffix, info, functools.partial(_read_member, tar, info))
                end_offset = tar.offset
            if not _only_zeros_after(self.path, end_offset):
                # tarfile stops quietly at a bad header past the first one: the rest is lost
                self.broken = TarBreak("bad header part-way", False, key, members)
                return
        except (tarfile.TarError, OSError, EOFError) as err:
            self.broken = TarBreak(str(err), True, key, members)
            return
        if key is not None:
            yield key, members


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    return tar.extractfile(info).read()  # type: ignore[union-attr]


def _split_member_name(name: str) -> tuple[str, str]:
    """``"dir/abc.cls"`` → ``("dir/abc", "cls")``: the key ends at the basename's first dot."""
    directory, base = os.path.split(name)
    stem, _, suffix = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, suffix.lower()


def label_problem(members: dict, num_classes: int | None = None) -> tuple[str, str] | None:
    """Why a sample's members cannot make a training sample — (reason, detail) — or None.

    ``members`` maps member suffixes to their contents (or anything, for the image); the reasons
    are fixed names, so they can be counted: ``missing jpg``, ``missing cls``, ``cls not an
    integer``, ``label out of range`` (``cls >= num_classes``, when ``num_classes`` is given).
    """
    if not any(suffix in members for suffix in _IMAGE_SUFFIXES):
        return "missing jpg", ""
    if "cls" not in members:
        return "missing cls", ""
    text = members["cls"].strip()
    if not text.isdigit():
        return "cls not an integer", f"cls is {members['cls'][:20]!r}"
    if num_classes is not None and int(text) >= num_classes:
        return "label out of range", f"{int(text)} not in [0, {num_classes})"
    return None


def _complete_sample(
    key: str, members: dict[str, bytes], path: str, stats: ReadStats
) -> tuple[str, bytes, int] | None:
    """Return the sample if it has a recognisable image and a valid label, else count a skip."""
    problem = label_problem(members)
    if problem is not None:
        stats.skip(problem[0], key, path)
        return None
    jpg = next(members[s] for s in _IMAGE_SUFFIXES if s in members)
    if not looks_like_image(jpg):
        stats.skip("jpg is not a recognisable, complete image", key, path)
        return None
    stats.samples += 1
    return key, jpg, int(members["cls"].strip())


def looks_like_image(data: bytes) -> bool:
    """Cheap check that ``data`` is a whole image: a JPEG with a parsable header and an
    end-of-image marker near its end, or another format PIL can identify and verify."""
    if data.startswith(_JPEG_SOI):
        if data.rfind(_JPEG_EOI, max(0, len(data) - _EOI_SEARCH_BYTES)) < 0:
            return False  # truncated
        try:
            simplejpeg.decode_jpeg_header(data)
            return True
        except ValueError:
            pass  # e.g. an unusual JPEG that libjpeg-turbo's header parser rejects; ask PIL
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types for bad data
        return False


def _only_zeros_after(path: str, offset: int) -> bool:
    """Whether the file holds nothing but zero padding from ``offset`` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return False
    return True
