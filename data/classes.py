"""The class table of a dataset: what label i means, as a WordNet ID and a human-readable name.

A trained network outputs class indices; to say "tench" instead of 0, an export carries this table
(cluster/ckpt/consolidate.py). It comes from where the labels were made:

- ``data.convert``'s ``manifest.json`` beside the shards: ``classes`` lists ``{index, wnid, name}``
  (``wnid`` is None for an imagefolder tree, whose ``name`` is the folder; ``name`` is None when
  ``--synsets`` gave only wnids);
- the demo dataset's ``manifest.json`` (data/demo.py): ``class_names``, no WordNet IDs;
- a synset file (``--synsets``'s format, data/convert.py ``read_synsets``): line i is class i.

Each entry is ``{"index": i, "wnid": str | None, "name": str | None}``; a table lists classes
0..n-1 in order.
"""

from __future__ import annotations

import json
import os

from data.convert import FORMAT as CONVERT_FORMAT
from data.convert import MANIFEST, ConvertError, read_synsets
from data.shards import expand_shards

__all__ = ["class_label", "class_table_for_shards", "read_class_table"]


def class_table_for_shards(pattern: str) -> tuple[list[dict], str] | None:
    """The class table of the shards ``pattern`` names and the manifest it came from, or None
    when no folder of theirs has a converter's or the demo's manifest (or the pattern matches
    nothing)."""
    try:
        paths = expand_shards(pattern)
    except ValueError:
        return None
    for folder in sorted({os.path.dirname(path) for path in paths}):
        file = os.path.join(folder, MANIFEST)
        try:
            return _from_manifest(file), file
        except (OSError, ValueError):
            continue
    return None


def read_class_table(path: str) -> list[dict]:
    """The class table in ``path``: a converter's or the demo's ``manifest.json``, or a synset
    file. Raises ValueError (one line) when it is neither."""
    if path.endswith(".json"):
        return _from_manifest(path)
    try:
        return [_entry(i, wnid, name) for i, (wnid, name) in enumerate(read_synsets(path))]
    except ConvertError as err:
        raise ValueError(f"{path} is not a synset file ('wnid [name]' per line): {err}") from None


def class_label(table: list[dict] | None, index: int) -> str:
    """``"tench (n01440764)"``, ``"cat"``, ``"n01440764"``, or ``"class 3"`` without a table."""
    if not table or not 0 <= index < len(table):
        return f"class {index}"
    entry = table[index]
    name, wnid = entry.get("name"), entry.get("wnid")
    if name and wnid:
        return f"{name} ({wnid})"
    return name or wnid or f"class {index}"


def _from_manifest(file: str) -> list[dict]:
    with open(file) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} is not a manifest")
    if manifest.get("format") == CONVERT_FORMAT:
        classes = sorted(manifest["classes"], key=lambda c: c["index"])
        if [c["index"] for c in classes] != list(range(len(classes))):
            raise ValueError(f"{file}: the class indices are not 0..{len(classes) - 1}")
        return [_entry(c["index"], c.get("wnid"), c.get("name")) for c in classes]
    if isinstance(manifest.get("class_names"), list):  # data/demo.py
        return [_entry(i, None, str(name)) for i, name in enumerate(manifest["class_names"])]
    raise ValueError(f"{file} is neither data.convert's nor the demo's manifest")


def _entry(index: int, wnid: str | None, name: str | None) -> dict:
    return {"index": index, "wnid": wnid, "name": name}
