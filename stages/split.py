"""Pipeline stages: which consecutive layers of a tower each stage holds, and what each layer costs.

A split is a literal table — one tuple of layer names per stage, in `LAYERS` order, covering every
layer once — written on the command line as ``conv1-conv2 | conv3-conv5 | fc6-fc8``. Both towers
use the same split, so stage s of tower 0 and stage s of tower 1 hold the two halves of the same
layers and exchange at any cross-connection inside the stage (a boundary right before conv3, fc6,
fc7 or fc8 is fine: the next stage's first act is that exchange).

The default split balances a per-layer cost profile (`balanced_split`), either

    flops: the multiply-adds of forward plus backward, from the shapes one tower's layers produce
        on the configured input (computed on the `meta` device: no memory, no arithmetic); or
    time: forward plus backward of each layer of both towers, measured on this process's device
        at the microbatch size. Small microbatches make the fully connected layers slow for their
        multiply-adds (their weights are read once per microbatch): at 224×224 and 8 images
        fc6 is 5% of the multiply-adds but a quarter of the CPU time.
"""

import functools
import time

import torch
from torch import nn

from stages.config import ModelConfig
from stages.reference import TwoTowerAlexNet
from stages.tower import LAYERS, HalfTower, cross_layers

Split = tuple[tuple[str, ...], ...]


def parse_split(text: str) -> Split:
    """``"conv1-conv2 | conv3-conv5 | fc6-fc8"`` → (("conv1", "conv2"), ("conv3", "conv4", "conv5"), ...).

    Each stage is ``first-last`` or a single layer; stages are separated by ``|``. Raises
    ValueError naming what is wrong: an unknown layer, a stage out of order, a layer skipped
    or repeated."""
    stages = []
    for part in text.split("|"):
        names = [name.strip() for name in part.split("-")]
        if not part.strip() or len(names) > 2 or not all(names):
            raise ValueError(f"stage {part.strip()!r} in {text!r} must be a layer or first-last, e.g. conv3-conv5")
        for name in names:
            if name not in LAYERS:
                raise ValueError(f"{name!r} in {text!r} is not a layer: layers are {', '.join(LAYERS)}")
        first, last = LAYERS.index(names[0]), LAYERS.index(names[-1])
        if last < first:
            raise ValueError(f"stage {part.strip()!r} in {text!r} runs backwards: write it as {names[-1]}-{names[0]}")
        stages.append(LAYERS[first : last + 1])
    check_split(tuple(stages))
    return tuple(stages)


def check_split(split: Split) -> None:
    """Every layer exactly once, in order, no stage empty."""
    flat = [name for stage in split for name in stage]
    if any(not stage for stage in split):
        raise ValueError(f"split {format_split(split)!r} has an empty stage")
    for name in LAYERS:
        if flat.count(name) > 1:
            raise ValueError(f"split {format_split(split)!r} repeats {name}: each layer belongs to one stage")
        if name not in flat:
            raise ValueError(f"split {format_split(split)!r} skips {name}: the stages must cover {LAYERS[0]}..{LAYERS[-1]}")
    if tuple(flat) != LAYERS:
        raise ValueError(f"split {format_split(split)!r} is out of order: layers run {', '.join(LAYERS)}")


def format_split(split: Split) -> str:
    """The command-line form: ``conv1-conv2 | conv3-fc8``."""
    return " | ".join(stage[0] if len(stage) == 1 else f"{stage[0]}-{stage[-1]}" for stage in split if stage)


@functools.lru_cache(maxsize=16)
def _profile(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """One tower's layers run on the meta device: each block's output shape and its learned
    layer's forward multiply-adds, per image."""
    with torch.device("meta"):
        tower = HalfTower(cfg, 0)
    shapes, macs = {}, {}
    x = torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta")
    for name, block in tower.layers.items():
        if name in cross_layers(cfg):
            x = torch.cat([x] * cfg.towers, dim=1)  # both towers' maps, as the exchange gives
        learned = block.conv if hasattr(block, "conv") else block.fc
        if isinstance(learned, nn.Conv2d):  # every output value reads in_channels·k·k inputs
            macs[name] = float(learned(x).numel() * learned.weight[0].numel())
        else:
            macs[name] = float(learned.weight.numel())
        x = block(x)
        shapes[name] = tuple(x.shape[1:])
    return shapes, macs


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each layer block's output shape for one image in one tower, e.g. conv2 → (128, 13, 13) at 224."""
    return _profile(cfg)[0]


def layer_costs(cfg: ModelConfig) -> dict[str, float]:
    """Forward + backward multiply-adds per image of one tower's share of each layer: backward
    costs twice the forward (input and weight gradients), except conv1's, which has no input
    gradient to compute."""
    return {name: macs * (2 if name == LAYERS[0] else 3) for name, macs in _profile(cfg)[1].items()}


def layer_times(cfg: ModelConfig, rows: int, threads: int, repeats: int = 3,
                memory_format: torch.memory_format = torch.channels_last) -> dict[str, float]:
    """Seconds of forward + backward of each layer of both towers for `rows` images on the CPU
    with `threads` threads (the fastest of `repeats` runs after a warm-up); random inputs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = {}
        x = torch.randn(rows, 3, cfg.image_size, cfg.image_size)
        for name in LAYERS:
            layer = TwoTowerAlexNet(cfg, layers=(name,)).to(memory_format=memory_format)
            inp = (x.contiguous(memory_format=memory_format) if x.dim() == 4 else x).requires_grad_(name != LAYERS[0])
            runs = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                out = layer(inp)
                out.backward(torch.ones_like(out))
                runs.append(time.perf_counter() - start)
            times[name] = min(runs[1:])
            x = out.detach()
        return times
    finally:
        torch.set_num_threads(previous)


def balanced_split(costs: dict[str, float], stages: int) -> Split:
    """The split of LAYERS into `stages` consecutive runs whose most expensive stage is cheapest
    (exact, by dynamic programming over the 8 layers); ties go to the earliest boundaries."""
    if not 1 <= stages <= len(LAYERS):
        raise ValueError(f"stages must be in 1..{len(LAYERS)} (one layer or more each), got {stages}")
    prefix = [0.0]
    for name in LAYERS:
        prefix.append(prefix[-1] + costs[name])

    @functools.cache
    def best(start: int, parts: int) -> tuple[float, tuple[int, ...]]:
        """(max stage cost, cut points) for LAYERS[start:] in `parts` stages."""
        if parts == 1:
            return prefix[len(LAYERS)] - prefix[start], ()
        options = []
        for cut in range(start + 1, len(LAYERS) - parts + 2):
            rest, cuts = best(cut, parts - 1)
            options.append((max(prefix[cut] - prefix[start], rest), (cut,) + cuts))
        return min(options)

    cuts = (0,) + best(0, stages)[1] + (len(LAYERS),)
    return tuple(LAYERS[a:b] for a, b in zip(cuts, cuts[1:]))


def split_table(split: Split, costs: dict[str, float] | None = None) -> str:
    """A printable table: stage, layers, and (when known) each stage's share of the cost."""
    total = sum(costs.values()) if costs else 0.0
    lines = []
    for s, layers in enumerate(split):
        line = f"  stage {s}: {', '.join(layers)}"
        if costs:
            share = sum(costs[name] for name in layers) / total
            line += f"  ({100 * share:.0f}% of forward+backward multiply-adds)"
        lines.append(line)
    return "\n".join(lines)


BALANCE = ("flops", "time")  # the stage_split values that ask for a balanced split


def resolve_split(cfg: ModelConfig, stages: int, text: str = "flops", rows: int = 0, threads: int = 1) -> Split:
    """The user's split (`text`, a table with `stages` stages) or one balanced by `text`'s
    profile: "flops", or "time" of `rows`-image microbatches on `threads` threads."""
    if text in BALANCE:
        if stages == 1:
            return (LAYERS,)
        costs = layer_costs(cfg) if text == "flops" else layer_times(cfg, rows, threads)
        return balanced_split(costs, stages)
    split = parse_split(text)
    if len(split) != stages:
        raise ValueError(f"split {text!r} has {len(split)} stage(s) but stages is {stages}")
    return split


def boundary_shape(cfg: ModelConfig, split: Split, stage: int, rows: int, towers_here: int) -> tuple[int, ...]:
    """The activation stage `stage` sends to stage + 1 for `rows` images: one tower's output maps,
    or both towers' concatenated (tower 0's first) when one process holds both towers."""
    shape = layer_shapes(cfg)[split[stage][-1]]
    return (rows, shape[0] * towers_here) + shape[1:]
