"""One state dict of the whole trained network from a checkpoint (`python -m cluster.export`,
cluster/export.py, is the command).

A checkpoint holds one shard per rank, each with its (stage, tower)'s layers. This gathers replica
0's shards into the reference network's state (`consolidate`), converts it to the grouped layout
(stages/grouped.py: `conv1.weight` (96, 3, 11, 11), ..., `fc8.weight` (1000, 4096), tower 0's
channels and units first) and writes it with `torch.save` as a plain dict of tensors, atomically.
Next to it, `OUT.json` records the model configuration, the source checkpoint and step, each
tensor's shape, and what inference needs (`inference_description`): the class table, the input
size, the mean, the preprocessing and the precision. `load_export` rebuilds either network from the
two files; cluster/serve/model.py reads exports of either format version.
"""

import dataclasses
import io
import json
import os
import re
import sys
import warnings

import torch
from torch import nn

from cluster.ckpt import checkpoint, storage
from cluster.ckpt.checkpoint import CheckpointError
from data.classes import class_table_for_shards, read_class_table
from data.normalize import MEAN_RGB
from stages.config import ModelConfig
from stages.grouped import grouped_from_state, reference_from_grouped, to_grouped
from stages.reference import TwoTowerAlexNet

LAYOUTS = ("grouped", "reference")
ARCHITECTURE = ("variant", "num_classes", "image_size")  # ModelConfig fields a manifest must give
EXPORT_FORMAT = "alexnet-towers export v2"  # the sidecar's `format`
# v1 lacks the inference fields (classes, input_size, mean_rgb, preprocessing, precision)
EXPORT_FORMATS = ("alexnet-towers export v1", EXPORT_FORMAT)
PRECISION = "float32"  # the weights' and the network's arithmetic


def model_config(manifest: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with, from its manifest's configuration."""
    saved = manifest.get(checkpoint.KEY_CONFIG, {})
    absent = [name for name in ARCHITECTURE if name not in saved]
    if absent:
        raise CheckpointError(f"the manifest's configuration lacks {', '.join(absent)}")
    saved = {**checkpoint.ARCHITECTURE_BEFORE, **saved}  # a manifest from before the ablation switches
    fields = {f.name: saved[f.name] for f in dataclasses.fields(ModelConfig) if f.name in saved}
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the manifest's configuration is not a model configuration: {err}") from None


def _layers(names) -> list[str]:
    """`towers.1.layers.fc8.fc.weight` -> `towers.1.layers.fc8`, each once, in order."""
    return list(dict.fromkeys(name.rsplit(".", 2)[0] for name in names))


def consolidate(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, reference state) of checkpoint `directory`: every shard of replica 0 verified
    and merged under the reference names `towers.{t}.layers.{layer}.{conv|fc}.{param}`. Raises
    CheckpointError when a shard does not verify, or a layer is missing, held twice or misshapen."""
    manifest, state, _ = _gather(directory, momentum=False)
    return manifest, _whole_network(directory, manifest, state)


def consolidate_with_momentum(directory: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(manifest, reference state, momentum by the same names): what a mesh of another shape
    loads to go on from this checkpoint (`TowerWorker.load_consolidated`)."""
    manifest, state, momentum = _gather(directory, momentum=True)
    return manifest, _whole_network(directory, manifest, state), momentum


def _whole_network(directory: str, manifest: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` in the reference's order, once checked to hold every layer once, in its shape."""
    cfg = model_config(manifest)
    with torch.device("meta"), warnings.catch_warnings():  # the expected names and shapes, no memory
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # 2012 variant: tower 1's fc8
        expected = {name: tuple(p.shape) for name, p in TwoTowerAlexNet(cfg).state_dict().items()}
    missing = _layers(name for name in expected if name not in state)
    unexpected = _layers(name for name in state if name not in expected)
    wrong = [f"{name} {tuple(state[name].shape)} (expected {shape})" for name, shape in expected.items()
             if name in state and tuple(state[name].shape) != shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {directory} does not hold the network exactly once: missing "
                              f"{missing or 'none'}, unexpected {unexpected or 'none'}, misshapen {wrong or 'none'}")
    return {name: state[name] for name in expected}


def _gather(directory: str, momentum: bool) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Replica 0's shards merged under reference names; with `momentum`, each parameter's
    velocity too (a shard's optimizer state is indexed in its model's parameter order)."""
    manifest = checkpoint.verify(directory)
    state, velocities, source = {}, {}, {}
    for shard in manifest[checkpoint.KEY_SHARDS]:
        try:
            saved = checkpoint.load_shard(directory, shard["file"])
            replica, _, tower = saved[checkpoint.SHARD_COORD]
            if replica != 0:  # the other replicas' shards hold only their RNG state
                continue
            model = saved[checkpoint.SHARD_MODEL]
            slots = saved[checkpoint.SHARD_OPTIMIZER]["state"] if momentum else {}
        except Exception as err:  # verified bytes that still do not load: not our format
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']} does not load as a shard: "
                                  f"{err}") from None
        for index, (key, tensor) in enumerate(model.items()):  # the model has parameters only
            # a HalfTower's keys (towers = 2) start `layers.`; a towers = 1 actor's are the reference's
            name = key if key.startswith("towers.") else f"towers.{tower}.{key}"
            if name in state:
                raise CheckpointError(f"checkpoint {directory}: {name} is in both {source[name]} and {shard['file']}")
            state[name], source[name] = tensor, shard["file"]
            if index in slots:
                velocities[name] = slots[index]["velocity"]
    return manifest, state, velocities


def find_checkpoint(path: str) -> str:
    """`path` if it is a checkpoint directory, else the newest complete checkpoint of run dir
    `path` whose shards verify. Raises CheckpointError saying what is there instead."""
    where = storage.open_storage(path)
    if not where.is_dir():
        raise CheckpointError(f"{path} is not a directory: pass a run dir or one of its "
                              f"checkpoint-NNNNNNNN directories")
    if storage.basename(path).startswith("checkpoint-"):
        if not where.child(checkpoint.MANIFEST).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: it has no {checkpoint.MANIFEST} "
                                  f"(the run stopped while writing it)")
        return path
    candidates = checkpoint.complete_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"run dir {path} has no complete checkpoint (checkpoint-NNNNNNNN/ with a "
                              f"{checkpoint.MANIFEST})")
    errors = []
    for directory in reversed(candidates):
        try:
            checkpoint.verify(directory)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        for error in errors:
            print(f"skipped a newer checkpoint: {error}", file=sys.stderr)
        return directory
    raise CheckpointError(f"no checkpoint of run dir {path} verifies; the newest: {errors[0]}")


def sidecar_path(out: str) -> str:
    """Where the description of export `out` goes: OUT.pt -> OUT.json."""
    return os.path.splitext(out)[0] + ".json"


def _to_json(description: dict) -> str:
    """Indented JSON with each shape on one line."""
    def one_line(match: re.Match) -> str:
        return "[" + ", ".join(number.strip() for number in match[1].split(",")) + "]"
    return re.sub(r"\[\s*([\d,\s]+?)\s*\]", one_line, json.dumps(description, indent=1))


def preprocessing(resize: int, crop: int) -> dict:
    """How an image becomes the network's input (data/transforms.py EvalTransform, TenViewTransform
    and normalize_batch): what training's evaluation did, so inference gets the same pixels."""
    return {
        "decode": "RGB, 8 bits per channel (data.transforms.decode_rgb)",
        "resize_shorter": resize,
        "centre_crop": resize,
        "crop": crop,
        "resize_filter": "antialiased bilinear on uint8 (torch), of the central square",
        "mean_rgb": list(MEAN_RGB),
        "scale": "0-255 RGB minus mean_rgb; no division",
        "views": {"1": f"the centre {crop}x{crop} crop",
                  "10": "the four corner and the centre crops and their horizontal flips, softmax averaged"},
    }


def class_table(manifest: dict, classes_file: str | None = None) -> tuple[list[dict] | None, str | None, str]:
    """(table, where it came from, a note) for a checkpoint's manifest: `classes_file` (a
    converter's or the demo's manifest.json, or a synset file) when given, else the manifest beside
    the run's training (or validation) shards. A table that does not have num_classes entries is
    an error when given, and left out (the note says why) when found."""
    num_classes = model_config(manifest).num_classes
    if classes_file:
        table = read_class_table(classes_file)
        if len(table) != num_classes:
            raise ValueError(f"classes {classes_file} lists {len(table)} classes, the network has {num_classes}")
        return table, os.path.abspath(classes_file), ""
    saved = manifest.get(checkpoint.KEY_CONFIG, {})
    for name in ("train_data", "val_data"):
        found = class_table_for_shards(saved.get(name) or "")
        if found is None:
            continue
        table, where = found
        if len(table) == num_classes:
            return table, where, ""
        return None, None, f"{where} lists {len(table)} classes, the network has {num_classes}: no class table"
    return None, None, "no data.convert manifest beside the run's shards: no class table (give --classes)"


def inference_description(manifest: dict, classes_file: str | None = None) -> tuple[dict, str]:
    """What inference needs of a checkpoint's network, as the export's JSON records it, and a note
    (empty, or why there is no class table)."""
    cfg = model_config(manifest)
    resize = int(manifest.get(checkpoint.KEY_CONFIG, {}).get("resize", 256))
    table, where, note = class_table(manifest, classes_file)
    return {"input_size": cfg.image_size, "mean_rgb": list(MEAN_RGB), "preprocessing": preprocessing(resize, cfg.image_size),
            "precision": PRECISION, "classes": table, "class_source": where}, note


def export(source: str, out: str, layout: str = "grouped", classes_file: str | None = None) -> dict:
    """Write the network of `source` (a run dir or a checkpoint dir) to `out` in `layout`, and its
    description to `sidecar_path(out)`; returns the description (with `note`: empty, or why it has
    no class table). `classes_file`: the class table (`class_table`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    directory = find_checkpoint(source)
    manifest, reference = consolidate(directory)
    cfg = model_config(manifest)
    inference, note = inference_description(manifest, classes_file)
    state = to_grouped(reference, cfg) if layout == "grouped" else reference
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    description = {
        "format": EXPORT_FORMAT,
        "layout": layout,
        "model_config": dataclasses.asdict(cfg),
        "checkpoint": storage.absolute(directory),
        "step": manifest[checkpoint.KEY_STEP],
        "epoch": manifest.get(checkpoint.KEY_EPOCH),
        "input": f"(b, 3, {cfg.image_size}, {cfg.image_size}) float32 RGB on the 0-255 scale minus the channel "
                 f"means {list(MEAN_RGB)} (data.normalize.normalize_batch); no other scaling",
        **inference,
        "parameters": sum(t.numel() for t in state.values()),
        "tensors": {name: list(t.shape) for name, t in state.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.open_storage(out).write_bytes(buffer.getbuffer())  # atomic: the old file or the whole new one
    storage.open_storage(sidecar_path(out)).write_bytes(_to_json(description).encode())
    return {**description, "note": note}


def export_model_config(description: dict) -> ModelConfig:
    """An export description's ModelConfig; one written before the ablation switches gets what it
    was trained with (checkpoint.ARCHITECTURE_BEFORE: torch's dropout, then the only one)."""
    return ModelConfig(**{**checkpoint.ARCHITECTURE_BEFORE, **description["model_config"]})


def load_export(path: str, network: str = "grouped") -> nn.Module:
    """The exported network, in eval mode on the CPU: `network` "grouped" (`GroupedAlexNet`) or
    "reference" (`TwoTowerAlexNet`), whichever layout the file was written in."""
    with open(sidecar_path(path)) as f:
        description = json.load(f)
    cfg = export_model_config(description)
    if network not in LAYOUTS:
        raise ValueError(f"network must be one of {', '.join(LAYOUTS)}, got {network!r}")
    state = torch.load(path, weights_only=True, map_location="cpu")
    if description["layout"] == "reference":
        state = to_grouped(state, cfg)
    return grouped_from_state(state, cfg) if network == "grouped" else reference_from_grouped(state, cfg)
