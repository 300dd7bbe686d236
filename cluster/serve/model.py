"""The trained network a command serves, from wherever it is: an export (`python -m cluster.export`:
OUT.pt and OUT.json), a run dir (its newest complete checkpoint that verifies) or a checkpoint dir.

`load_model` gives a `Model`: the whole network's weights under the reference's names (one state,
whatever the layout it was stored in: the mesh loads it with `load_consolidated`, one process
builds `TwoTowerAlexNet` from it), its ModelConfig, the preprocessing training evaluated with
(resize the shorter side, centre crop), the class table, and where it came from.

An export written before the inference fields existed (format v1) still loads: what it lacks is
taken from the checkpoint it names when that is still there, else the resize falls back to the
paper's ratio (256 for 224) and there is no class table; each fallback is a line in `notes`.
Anything unusable (no such file, a JSON that does not parse, weights that do not fit) is a
`ModelError` whose message is one line; the commands exit 2 with it.
"""

import dataclasses
import hashlib
import json
import os

import torch

from cluster.ckpt import checkpoint, storage
from cluster.ckpt.checkpoint import CheckpointError
from cluster.ckpt.consolidate import (EXPORT_FORMATS, consolidate, export_model_config, find_checkpoint,
                                      inference_description, model_config, sidecar_path)
from data.classes import read_class_table
from stages.config import ModelConfig
from stages.grouped import from_grouped
from stages.reference import TwoTowerAlexNet

PAPER_RESIZE_RATIO = 256 / 224  # PAPER.md §Data: shorter side 256 for 224 crops


class ModelError(ValueError):
    """A MODEL or SOURCE that cannot be served; the message is one line."""


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]  # the reference's names: towers.{t}.layers.{layer}.{conv|fc}.{param}
    resize: int  # shorter side → resize, centre crop resize × resize, then the cfg.image_size crop(s)
    classes: list[dict] | None  # data/classes.py entries, or None: indices only
    source: str  # what the user gave
    kind: str  # "export" or "checkpoint"
    fingerprint: str  # identifies the weights (cluster.infer's outputs record it)
    checkpoint: str | None = None  # the checkpoint the weights come from
    step: int | None = None
    training: dict | None = None  # the run's configuration (from the checkpoint's manifest)
    notes: list[str] = dataclasses.field(default_factory=list)  # fallbacks taken, for the user

    @property
    def crop(self) -> int:
        return self.cfg.image_size

    @property
    def run_dir(self) -> str | None:
        """The run dir of the checkpoint, where its history is."""
        return os.path.dirname(self.checkpoint.rstrip("/")) if self.checkpoint else None

    def network(self, device: torch.device | str = "cpu", memory_format=torch.channels_last) -> TwoTowerAlexNet:
        """The single-process reference network with these weights, in eval mode on `device`."""
        net = TwoTowerAlexNet(self.cfg)
        net.load_state_dict(self.state)
        return net.to(device, memory_format=memory_format).eval()

    def describe(self) -> str:
        """`step 60 of /runs/demo/checkpoint-00000060` or `export alexnet.pt (step 60)`."""
        where = f"step {self.step} of {self.checkpoint}" if self.checkpoint else "an export of unknown origin"
        return where if self.kind == "checkpoint" else f"export {self.source} ({where})"


def load_model(source: str, classes_file: str | None = None) -> Model:
    """The network at `source` (module docstring); `classes_file` replaces its class table."""
    if source.endswith(".json"):
        source = os.path.splitext(source)[0] + ".pt"
    if os.path.isfile(source):
        model = _from_export(source)
    elif storage.is_uri(source) or os.path.isdir(source):
        model = _from_checkpoint(source)
    else:
        raise ModelError(f"{source} does not exist: give an export (a .pt with its .json, from python -m "
                         f"cluster.export), a run dir or a checkpoint-NNNNNNNN directory")
    if classes_file:
        try:
            model.classes = read_class_table(classes_file)
        except (OSError, ValueError) as err:
            raise ModelError(f"classes {classes_file}: {one_line(err)}") from None
        if len(model.classes) != model.cfg.num_classes:
            raise ModelError(f"classes {classes_file} lists {len(model.classes)} classes, the network has "
                             f"{model.cfg.num_classes}")
    return model


def _from_checkpoint(path: str) -> Model:
    try:
        directory = find_checkpoint(path)
        manifest, state = consolidate(directory)
        inference, _ = inference_description(manifest)  # without a class table, classes are shown by index
    except (CheckpointError, OSError, ValueError) as err:
        raise ModelError(one_line(err)) from None
    digest = hashlib.sha256("".join(shard["sha256"] for shard in manifest[checkpoint.KEY_SHARDS]).encode())
    return Model(model_config(manifest), state, inference["preprocessing"]["resize_shorter"], inference["classes"],
                 path, "checkpoint", digest.hexdigest()[:16], storage.absolute(directory),
                 manifest[checkpoint.KEY_STEP], manifest[checkpoint.KEY_CONFIG])


def _from_export(path: str) -> Model:
    description = _read_description(path)
    try:
        cfg = export_model_config(description)
        state = torch.load(path, weights_only=True, map_location="cpu")
        if description.get("layout", "grouped") == "grouped":
            state = from_grouped(state, cfg)
        TwoTowerAlexNet(cfg).load_state_dict(state)  # every tensor there, in its shape
    except Exception as err:  # a torch pickle, a state or a config that does not fit: all unusable
        raise ModelError(f"export {path} does not load: {one_line(err)}") from None
    model = Model(cfg, state, 0, description.get("classes"), path, "export", checkpoint.sha256_file(path)[:16],
                  description.get("checkpoint"), description.get("step"))
    try:  # the run it came from, when it is still there: its configuration and history
        manifest = checkpoint.read_manifest(model.checkpoint) if model.checkpoint else None
    except (OSError, ValueError):
        manifest = None
    model.training = manifest.get(checkpoint.KEY_CONFIG) if isinstance(manifest, dict) else None
    _fill_preprocessing(model, description, manifest)
    return model


def _read_description(path: str) -> dict:
    sidecar = sidecar_path(path)
    try:
        with open(sidecar) as f:
            description = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"export {path} has no description {sidecar}: python -m cluster.export writes both; "
                         f"export again, or keep the two files together") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"export description {sidecar} is not readable JSON: {one_line(err)}") from None
    if not isinstance(description, dict) or description.get("format") not in EXPORT_FORMATS:
        got = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise ModelError(f"{sidecar} is not an export description (format {got!r}, expected one of "
                         f"{', '.join(EXPORT_FORMATS)})")
    if not isinstance(description.get("model_config"), dict):
        raise ModelError(f"{sidecar} has no model_config")
    return description


def _fill_preprocessing(model: Model, description: dict, manifest: dict | None) -> None:
    """The resize of `description`; for an older export, from the manifest of the checkpoint it
    names if that is still there (and the class table too), else the paper's ratio (a note says
    which)."""
    resize = description.get("preprocessing", {}).get("resize_shorter")
    if resize is not None:
        model.resize = int(resize)
        return
    try:
        inference, _ = inference_description(manifest)
    except (TypeError, ValueError, KeyError, AttributeError):
        model.resize = round(model.crop * PAPER_RESIZE_RATIO)
        model.notes.append(f"export {model.source} records no preprocessing (an older export) and its checkpoint "
                           f"is gone: resizing the shorter side to {model.resize} (the paper's 256 for 224), no "
                           f"class table; export again from the run to record what it trained with")
        return
    model.resize = inference["preprocessing"]["resize_shorter"]
    model.classes = model.classes or inference["classes"]
    model.notes.append(f"export {model.source} records no preprocessing (an older export): resize {model.resize} "
                       f"taken from its checkpoint {model.checkpoint}; export again to record it")


def one_line(err: BaseException) -> str:
    """An error's message on one line (the commands' errors are one line each)."""
    return " ".join(str(err).split()) or type(err).__name__
