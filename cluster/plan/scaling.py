"""Scaling model: the step time of a replica × stage × tower mesh on N GPUs over a number of nodes,
from this network's per-layer compute and the bytes each kind of traffic moves over which link;
and the same for Krizhevsky's "one weird trick" (arXiv:1404.5997) for comparison. docs/SCALING.md
explains it and gives its tables; bench/scaling.py prints them and measures the all-reduce here.

Pure arithmetic: it imports stages/ (shapes, multiply-adds), cluster.plan (the schedules,
the replica limit, the placement rule and the gradient buckets the runtime uses), never Ray.

Inputs
  compute   seconds of forward + backward of one layer for `images` images on one GPU holding
            `halves` tower halves of it (2: both towers, towers = 1; 1: one tower; 2/K: a K-th of
            a fully connected layer). Either `Measured` (stages.split.layer_times on this CPU,
            linear in images) or `Device` (multiply-adds at a stated effective FLOP/s, a roofline
            for the weight reads, and a fixed per-layer launch cost).
  traffic   from the layer shapes (stages.split.layer_shapes, boundary_shape): what each tower
            sends at conv3, fc6, fc7, fc8 (and the loss's 2 values per image), forward and
            backward; the activations at a stage cut; the gradients of each (stage, tower)'s
            parameters (60,965,224 in all) for the all-reduce.
  links     `Links`: intra-node bandwidth and latency (NVLink or PCIe; the pair of towers and
            every collective that stays in a node) and the inter-node bandwidth per node, shared
            by every flow that leaves the node at once (one NIC, or all of them together).

Equations (per optimizer step; B images per replica in M microbatches of b = B / M rows)
  exchange   x = α_intra + b · v · bytes / bw_intra at each crossing layer of the stage (v: the
             values one tower sends per image), forward and backward, on the critical path: the
             collectives block.
  stage      f_s = Σ forward + Σ x,  b_s = Σ backward + Σ x over the stage's layers, per microbatch.
  cut        c = α + b · v · bytes / bw one way per microbatch; an inter-node cut waits for every
             lane and cut leaving its node (the NIC is shared, work-conserving). Links are full
             duplex, so in steady state a cut is busy c per microbatch.
  pipeline   1F1B: T = Σ_s (f_s + b_s) + 2 Σ_c c + (M − 1) · max(max_s (f_s + b_s), max_c c);
             GPipe: T = Σ f + Σ c + (M − 1) max(f, c) + Σ b + Σ c + (M − 1) max(b, c).
             Equal stages and free links give the ideal bubble (S − 1) / (M + S − 1)
             (cluster.plan.schedule.expected_bubble, with the links as extra stages).
  all-reduce ring over the R replicas of each (stage, tower): 2 (R − 1) / R · V / bw + 2 (R − 1) · α
             per bucket of V bytes. Inside a node bw = bw_intra. Across nodes each ring crosses
             each of its nodes' NICs once, and the rings sharing a NIC share it fairly, all
             starting together: a ring of V bytes ends after Σ_h min(V_h, V) / bw_inter.
  overlap    as cluster/rank/gradsync.py does it: 25 MiB buckets of the parameters, last layer first,
             each launched once its gradients are final, i.e. during the last microbatch's
             backward of the stage, strictly in order, one at a time on the link. Stage s's last
             backward ends Σ_{s' < s} (b_s' + c) before the pipeline's end (stage 0's), so later
             stages have that much longer; exposed = how far the last reduction runs past the
             pipeline's end.
  step       max over stages of (end of its reduction, or of its backward) + its optimizer step
             (memory-bound: 20 bytes per parameter: read w, g, v; write w, v).
  OWT        see `owt_step`.

Not modelled: the input pipeline, CPU contention between the all-reduce and compute (it matters
on CPUs, see bench/scaling.py), NCCL's tree algorithm and hierarchical collectives, congestion
beyond the per-node NIC share, activation memory traffic, memory capacity (AlexNet fits anywhere).
"""

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Iterator

import torch

from cluster.plan.buckets import DEFAULT_BUCKET_BYTES, bucket_layout
from cluster.plan.mesh import MAX_REPLICAS, Mesh
from cluster.plan.placement import Node, PlacementError, plan_placement
from cluster.plan.schedule import SCHEDULES, ideal_bubble
from stages.config import TOWERS, ModelConfig
from stages.split import Split, boundary_shape, layer_costs, layer_shapes
from stages.tower import CROSS_LAYERS, LAYERS, HalfTower

GBIT = 1e9 / 8  # bytes per second in one Gb/s
MIB = 2**20
BUCKET_BYTES = DEFAULT_BUCKET_BYTES  # the runtime's (cluster/plan/buckets.py)
OPTIMIZER_BYTES_PER_PARAM = 20  # fp32: read weight, gradient, momentum; write weight, momentum
WEIGHT_PASSES = 4  # a layer's weights are read in forward and backward, its gradient read and written
CONV_LAYERS = LAYERS[:5]
PAPER = ModelConfig()  # 224×224, 1000 classes: the network the GPU tables are for
FC_LAYERS = LAYERS[5:]


# --- the network: what this project's layers cost and send

@dataclasses.dataclass(frozen=True)
class Network:
    """Per-tower, per-image facts of one ModelConfig, from the layer shapes."""

    cfg: ModelConfig
    macs: dict  # layer → forward + backward multiply-adds of one tower per image (layer_costs)
    forward_share: dict  # layer → forward's share of those
    params: dict  # (tower, layer) → parameters (weight + bias)
    outputs: dict  # layer → values one tower's block outputs per image

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def layer_params(self, layer: str) -> int:
        """Both towers' parameters of a layer."""
        return sum(self.params[(t, layer)] for t in range(TOWERS))

    def exchange_values(self, layer: str) -> int:
        """Values one tower sends its partner per image at a crossing layer, one direction: its own
        input maps forward (all-gather), the partner's slice of their gradient backward
        (reduce-scatter). "loss": the sharded softmax's (lse, target logit) pair."""
        if layer == "loss":
            return 2
        if layer not in CROSS_LAYERS:
            return 0
        return self.outputs[LAYERS[LAYERS.index(layer) - 1]]

    def cut_values(self, split: Split, stage: int, towers_here: int) -> int:
        """Values one lane sends per image across the cut after `stage` (stages.split.boundary_shape)."""
        return math.prod(boundary_shape(self.cfg, split, stage, 1, towers_here)[1:])


@functools.lru_cache(maxsize=8)
def network(cfg: ModelConfig = PAPER) -> Network:
    shapes, costs = layer_shapes(cfg), layer_costs(cfg)
    params = {}
    with torch.device("meta"), warnings.catch_warnings():  # shapes only: no memory, no arithmetic
        warnings.simplefilter("ignore", UserWarning)  # the 2012 code's empty fc8 on tower 1
        for tower in range(TOWERS):
            half = HalfTower(cfg, tower)
            for name, block in half.layers.items():
                params[(tower, name)] = sum(p.numel() for p in block.parameters())
    return Network(cfg=cfg, macs=costs,
                   forward_share={name: 1 / 2 if name == LAYERS[0] else 1 / 3 for name in LAYERS},
                   params=params, outputs={name: math.prod(shape) for name, shape in shapes.items()})


# --- compute: seconds of forward + backward of a layer

@dataclasses.dataclass(frozen=True)
class Device:
    """An accelerator described by an effective rate, a memory bandwidth and a launch cost."""

    name: str
    flops: float  # effective FLOP/s on this network's layers (an assumption: see `source`)
    memory_bytes_s: float  # memory bandwidth: weight reads of small microbatches and the optimizer
    layer_overhead_s: float  # per layer per microbatch, forward + backward (kernel launches)
    source: str

    def seconds(self, net: Network, layer: str, images: float, halves: float) -> float:
        flops = 2 * net.macs[layer] * images * halves
        weights = 4 * net.layer_params(layer) / TOWERS * halves * WEIGHT_PASSES  # fp32 weights
        return max(flops / self.flops, weights / self.memory_bytes_s) + self.layer_overhead_s

    def with_flops(self, scale: float) -> "Device":
        return dataclasses.replace(self, name=f"{self.name} ×{scale:g}", flops=self.flops * scale)


H100_TF32 = Device(
    name="H100 SXM, TF32", flops=0.25 * 494.7e12, memory_bytes_s=3.35e12, layer_overhead_s=20e-6,
    source="NVIDIA H100 SXM datasheet: 494.7 TFLOP/s dense TF32, 3.35 TB/s HBM3. Assumed, not measured "
           "(no GPU here): 25% of the TF32 peak on this network's layers, ~124 TFLOP/s, ~29k images/s "
           "for one GPU. For scale: Torch + cuDNN 5.1 trained the one-tower AlexNet on a Pascal Titan X "
           "at 128 images in 46 ms (yuyu2172/chainer-performance-improvements, BENCHMARK.md), ~12 "
           "TFLOP/s, about that card's fp32 peak; tensor cores are much harder to fill with 48- and "
           "128-channel convolutions, and LRN, pooling and ReLU are memory-bound. 20 µs of kernel "
           "launches per layer per microbatch.")


@dataclasses.dataclass(frozen=True)
class Measured:
    """Per-layer times measured by stages.split.layer_times: seconds of forward + backward of both
    towers of each layer for `rows` images; scaled linearly to other sizes."""

    times: dict
    rows: int
    memory_bytes_s: float = 10e9  # the optimizer's memory-bound update (a CPU's, roughly)
    name: str = "measured"

    def seconds(self, net: Network, layer: str, images: float, halves: float) -> float:
        return self.times[layer] / (TOWERS * self.rows) * images * halves


# --- links and the cluster

@dataclasses.dataclass(frozen=True)
class Links:
    """Bandwidths in bytes/s, latencies in seconds."""

    intra_bytes_s: float
    intra_latency_s: float
    inter_bytes_s: float  # per node, shared by every flow that leaves it at once
    inter_latency_s: float
    name: str = ""


def gpu_links(inter_gbit_s: float, intra: str = "nvlink") -> Links:
    """NVLink 4 (H100 SXM: 900 GB/s both ways, 450 one way; assumed 80% of that, 360 GB/s) or
    PCIe Gen5 x16 (64 GB/s one way; assumed 50 GB/s), 5 µs per hop; `inter_gbit_s` per node
    (nominal; NCCL reaches ~90% of it on large messages), 10 µs per hop."""
    bw = {"nvlink": 360e9, "pcie": 50e9}[intra]
    return Links(bw, 5e-6, inter_gbit_s * GBIT, 10e-6, f"{intra}, {inter_gbit_s:g} Gb/s per node")


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    links: Links

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def cluster(gpus: int, nodes: int, links: Links) -> Cluster:
    if gpus % nodes:
        raise ValueError(f"{gpus} GPUs do not spread evenly over {nodes} nodes")
    return Cluster(nodes, gpus // nodes, links)


def place(replicas: int, stages: int, towers: int, nodes: int, gpus_per_node: int) -> list[list[int]] | None:
    """The node index of every (replica, stage), or None if the mesh does not fit: the runtime's
    rule (cluster/plan/placement.py `plan_placement`) on `nodes` equal nodes, one GPU per actor."""
    cluster_nodes = [Node(f"{n:06d}", f"node {n}", {"GPU": gpus_per_node}) for n in range(nodes)]
    try:
        plan = plan_placement(Mesh(replicas, stages, towers), {"GPU": 1}, cluster_nodes)
    except PlacementError:
        return None
    return [[int(node.node_id) for node in where] for where in plan]


def meshes(gpus: int, nodes: int) -> list[tuple[int, int, int]]:
    """Every (replicas, stages, towers) with replicas · stages · towers = gpus that the placement
    rule can put on `nodes` equal nodes, one GPU per rank."""
    found = []
    for towers in (2, 1):
        for stages in range(1, len(LAYERS) + 1):
            if gpus % (stages * towers):
                continue
            replicas = gpus // (stages * towers)
            if replicas > MAX_REPLICAS or gpus % nodes:
                continue
            if place(replicas, stages, towers, nodes, gpus // nodes) is not None:
                found.append((replicas, stages, towers))
    return found


def splits(stages: int) -> Iterator[Split]:
    """Every split of LAYERS into `stages` consecutive non-empty stages."""
    for cuts in itertools.combinations(range(1, len(LAYERS)), stages - 1):
        bounds = (0,) + cuts + (len(LAYERS),)
        yield tuple(LAYERS[a:b] for a, b in itertools.pairwise(bounds))


# --- collectives

def ring_allreduce_s(nbytes: float, ranks: int, bytes_s: float, latency_s: float) -> float:
    """Ring all-reduce: a reduce-scatter and an all-gather, each R − 1 steps of bytes / R."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bytes_s + 2 * (ranks - 1) * latency_s


def ring_allgather_s(total_bytes: float, ranks: int, bytes_s: float, latency_s: float) -> float:
    """Ring all-gather of `total_bytes` in all (each rank contributes 1/R); a reduce-scatter of
    the same tensor costs the same."""
    if ranks <= 1 or total_bytes <= 0:
        return 0.0
    return (ranks - 1) / ranks * total_bytes / bytes_s + (ranks - 1) * latency_s


def buckets(sizes: list[tuple[str, int]], bucket_bytes: int, dtype_bytes: int) -> list[tuple[int, list[str]]]:
    """The runtime's buckets (cluster/plan/buckets.py) of `sizes`, (layer, parameters) in module
    order, at `dtype_bytes` per value. Returns (bytes, layers) per bucket, in launch order."""
    layout = bucket_layout([numel * dtype_bytes for _, numel in sizes], bucket_bytes)
    return [(sum(sizes[i][1] for i in indices) * dtype_bytes, [sizes[i][0] for i in indices]) for indices in layout]


def overlapped_end(bucket_list: list[tuple[int, list[str]]], ready: dict, seconds) -> float:
    """When the last bucket's reduction ends: buckets launch in order once ready (`ready[layer]`:
    when that layer's gradient is final) and share the link one at a time (`seconds(bytes)`)."""
    launched = end = -math.inf
    for nbytes, layers in bucket_list:
        launched = max(launched, max(ready[layer] for layer in layers))
        end = max(launched, end) + seconds(nbytes)
    return end


# --- the mesh's step

@dataclasses.dataclass(frozen=True)
class Traffic:
    kind: str  # "exchange", "p2p", "all-reduce", "all-gather" (OWT)
    link: str  # INTRA (NVLink/PCIe), INTER (the nodes' NICs) or NONE
    bytes_per_gpu: float  # sent by one GPU per step (the busiest)
    seconds: float  # its time per step (for all-reduce: the whole reduction, overlapped or not)


@dataclasses.dataclass(frozen=True)
class Estimate:
    scheme: str  # "mesh" or "one weird trick"
    replicas: int
    stages: int
    towers: int
    microbatches: int
    batch: int  # per replica
    split: Split
    step_s: float
    compute_s: float  # the busiest GPU's forward + backward compute
    pipeline_s: float  # end of the last backward (pipeline incl. exchange and transfers)
    bubble: float  # modelled idle share of the pipeline; ideal (S − 1)/(M + S − 1) for equal stages
    exchange_s: float  # the busiest stage's cross-tower exchanges per step
    p2p_s: float  # per step on the slowest cut, one way
    allreduce_s: float  # the slowest group's whole reduction
    allreduce_exposed_s: float  # how far the reductions run past the pipeline's end
    optimizer_s: float
    traffic: tuple

    @property
    def global_batch(self) -> int:
        return self.replicas * self.batch

    @property
    def images_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def gpus(self) -> int:
        return self.replicas * self.stages * self.towers

    def shape(self) -> str:
        if self.scheme != "mesh":
            return f"OWT K={self.gpus}"
        return f"R={self.replicas} S={self.stages} T={self.towers} M={self.microbatches}"


INTRA, INTER, NONE = "intra-node", "inter-node", "none"


def _stage_times(net: Network, compute, links: Links, split: Split, towers: int, rows: int, act_bytes: int):
    """Per microbatch: each layer's forward and backward compute, and each stage's exchanges
    (layer → seconds, one direction; "loss" on the last stage)."""
    halves = TOWERS // towers
    whole = {n: compute.seconds(net, n, rows, halves) for n in LAYERS}
    fwd = {n: whole[n] * net.forward_share[n] for n in LAYERS}
    bwd = {n: whole[n] - fwd[n] for n in LAYERS}
    exch = []
    for s, layers in enumerate(split):
        names = [n for n in layers if n in CROSS_LAYERS] + (["loss"] if s == len(split) - 1 else [])
        exch.append({n: links.intra_latency_s + rows * net.exchange_values(n) * act_bytes / links.intra_bytes_s
                     for n in names} if towers == TOWERS else {})
    return fwd, bwd, exch


def _cut_times(net: Network, links: Links, plan: list[list[int]], nodes: int, split: Split, towers: int,
               rows: int, act_bytes: int) -> tuple[list[float], list[str]]:
    """One microbatch's transfer across each cut, one way, on the slowest replica; an inter-node
    cut waits for everything leaving its node per microbatch (the NIC is shared, work-conserving)."""
    halves = TOWERS // towers
    lane = [rows * net.cut_values(split, s, halves) * act_bytes for s in range(len(split) - 1)]
    leaving = [0.0] * nodes  # bytes leaving each node per microbatch, every lane and cut
    for where in plan:
        for s, nbytes in enumerate(lane):
            if where[s] != where[s + 1]:
                leaving[where[s]] += towers * nbytes
    cuts, kinds = [], []
    for s, nbytes in enumerate(lane):
        inter = [where[s] for where in plan if where[s] != where[s + 1]]
        intra = links.intra_latency_s + nbytes / links.intra_bytes_s
        cuts.append(max([intra] + [links.inter_latency_s + leaving[n] / links.inter_bytes_s for n in inter]))
        kinds.append(INTER if inter else INTRA)
    return cuts, kinds


def _allreduce_links(links: Links, plan: list[list[int]], group_bytes: list[float], towers: int) -> list[tuple]:
    """(bytes/s, latency, link) for each stage's replica groups. A group whose replicas share a
    node rings over NVLink/PCIe. One that spans nodes crosses each of its nodes' NICs once; rings
    that share a NIC share it fairly (processor sharing, all starting together), so a ring of V
    bytes ends after Σ_h min(V_h, V) / bw_inter: it sees bw_inter · V / Σ_h min(V_h, V)."""
    stages = len(group_bytes)
    nodes_of = [{where[s] for where in plan} for s in range(stages)]
    crossing = [s for s in range(stages) if len(nodes_of[s]) > 1]
    out = []
    for s in range(stages):
        if s not in crossing:
            out.append((links.intra_bytes_s, links.intra_latency_s, INTRA))
            continue
        v = group_bytes[s]
        share = max(sum(towers * min(group_bytes[h], v) for h in crossing if node in nodes_of[h]) / v
                    for node in nodes_of[s])
        out.append((min(links.intra_bytes_s, links.inter_bytes_s / share), links.inter_latency_s, INTER))
    return out


def mesh_step(net: Network, compute, where: Cluster, replicas: int, stages: int, towers: int,
              microbatches: int, batch: int, split: Split, schedule: str = "1f1b",
              act_bytes: int = 4, grad_bytes: int = 4, bucket_bytes: int = BUCKET_BYTES,
              overlap: bool = True) -> Estimate:
    """The modelled step of one mesh shape, `batch` images per replica (module docstring: the
    equations)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if len(split) != stages:
        raise ValueError(f"split has {len(split)} stages, the mesh {stages}")
    if batch % microbatches:
        raise ValueError(f"batch {batch} is not divisible by microbatches {microbatches}")
    plan = place(replicas, stages, towers, where.nodes, where.gpus_per_node)
    if plan is None:
        raise ValueError(f"R={replicas} S={stages} T={towers} does not fit {where.nodes} node(s) of "
                         f"{where.gpus_per_node} GPU(s)")
    links, m, halves = where.links, microbatches, TOWERS // towers
    rows = batch // m

    # the pipeline: stages of forward/backward compute plus their exchanges, cuts as link stages
    fwd, bwd, exch = _stage_times(net, compute, links, split, towers, rows, act_bytes)
    f = [sum(fwd[n] for n in layers) + sum(exch[s].values()) for s, layers in enumerate(split)]
    b = [sum(bwd[n] for n in layers) + sum(exch[s].values()) for s, layers in enumerate(split)]
    cut, cut_kind = _cut_times(net, links, plan, where.nodes, split, towers, rows, act_bytes)
    slowest_cut = max(cut, default=0.0)
    both = [x + y for x, y in zip(f, b)]
    if schedule == "1f1b":
        pipeline = sum(both) + 2 * sum(cut) + (m - 1) * max(max(both), slowest_cut)
    else:
        pipeline = (sum(f) + sum(cut) + (m - 1) * max(max(f), slowest_cut)
                    + sum(b) + sum(cut) + (m - 1) * max(max(b), slowest_cut))
    bubble = 1 - m * sum(both) / stages / pipeline

    # each GPU's parameters in module order: tower 0's (the larger fc8 in the 2012 variant) or both
    sizes = [[(n, net.params[(t, n)]) for t in range(halves) for n in layers] for layers in split]
    group_bytes = [sum(numel for _, numel in stage) * grad_bytes for stage in sizes]
    ar_links = _allreduce_links(links, plan, group_bytes, towers)

    # each stage's end, its all-reduce (overlapped with its last backward) and optimizer step
    step = allreduce = optimizer = 0.0
    latest = pipeline  # when the last stage's reduction ends (stage 0's backward ends the pipeline)
    for s, layers in enumerate(split):
        end = pipeline - sum(b[i] + cut[i] for i in range(s))  # the backward still crosses stages < s
        finish = end
        if replicas > 1:
            bw, latency, _ = ar_links[s]
            seconds = functools.partial(ring_allreduce_s, ranks=replicas, bytes_s=bw, latency_s=latency)
            bucket_list = buckets(sizes[s], bucket_bytes, grad_bytes)
            full = sum(seconds(nbytes) for nbytes, _ in bucket_list)
            if overlap:  # gradients become final during the last microbatch's backward, last layer first
                clock, ready = end - b[s] + exch[s].get("loss", 0.0), {}
                for n in reversed(layers):
                    clock += bwd[n]
                    ready[n] = clock
                    clock += exch[s].get(n, 0.0)
                finish = max(end, overlapped_end(bucket_list, ready, seconds))
            else:
                finish = end + full
            allreduce, latest = max(allreduce, full), max(latest, finish)
        opt = sum(numel for _, numel in sizes[s]) * OPTIMIZER_BYTES_PER_PARAM / compute.memory_bytes_s
        optimizer = max(optimizer, opt)
        step = max(step, finish + opt)

    exposed = latest - pipeline  # what the reductions add after the pipeline's end
    exchange_bytes = [2 * batch * sum(net.exchange_values(n) for n in stage) * act_bytes for stage in exch]
    cut_bytes = [batch * net.cut_values(split, s, halves) * act_bytes for s in range(stages - 1)]
    traffic = (
        Traffic("exchange", INTRA if towers == TOWERS else NONE, max(exchange_bytes),
                m * max(2 * sum(stage.values()) for stage in exch)),
        Traffic("p2p", INTER if INTER in cut_kind else (INTRA if cut else NONE), max(cut_bytes, default=0.0),
                m * slowest_cut),
        Traffic("all-reduce", NONE if replicas == 1 else (INTER if any(k == INTER for *_, k in ar_links) else INTRA),
                2 * (replicas - 1) / replicas * max(group_bytes), allreduce),
    )
    compute_s = max(m * sum(fwd[n] + bwd[n] for n in layers) for layers in split)
    return Estimate("mesh", replicas, stages, towers, m, batch, split, step, compute_s, pipeline, bubble,
                    traffic[0].seconds, traffic[1].seconds, allreduce, exposed, optimizer, traffic)


def best_mesh_step(net: Network, compute, where: Cluster, replicas: int, stages: int, towers: int,
                   global_batch: int, max_microbatches: int = 128, **kw) -> Estimate | None:
    """The fastest (split, microbatches) for one mesh shape at a global batch; None when the
    replicas do not divide the batch."""
    if global_batch % replicas:
        return None
    batch = global_batch // replicas
    options = [m for m in range(1, min(batch, max_microbatches) + 1) if batch % m == 0]
    if stages == 1:
        options = [1]  # more microbatches only add per-microbatch costs without a pipeline
    best = None
    for split in splits(stages):
        for m in options:
            est = mesh_step(net, compute, where, replicas, stages, towers, m, batch, split, **kw)
            if best is None or est.step_s < best.step_s:
                best = est
    return best


def rank_meshes(net: Network, compute, where: Cluster, global_batch: int, **kw) -> list[Estimate]:
    """Every placeable mesh shape on the cluster at its best split and M, fastest first."""
    found = [best_mesh_step(net, compute, where, r, s, t, global_batch, **kw)
             for r, s, t in meshes(where.gpus, where.nodes)]
    return sorted((e for e in found if e is not None), key=lambda e: e.step_s)


# --- the one weird trick (Krizhevsky 2014): data-parallel convolutions, model-parallel FC

def owt_step(net: Network, compute, where: Cluster, global_batch: int, act_bytes: int = 4,
             grad_bytes: int = 4, bucket_bytes: int = BUCKET_BYTES) -> Estimate:
    """K = every GPU. Each holds all of conv1–conv5 (both towers) and trains them on its
    global_batch / K images; their gradients (2.3 M parameters) are all-reduced, overlapped with
    the convolutions' backward. fc6–fc8 are sharded by output unit (a K-th of each layer, 96% of
    the parameters, never all-reduced) and run on the whole global batch: pool5 (9216 values per
    image), fc6's and fc7's outputs (4096 each) are all-gathered over the K GPUs forward and
    reduce-scattered backward. The paper's scheme is this with the all-gathers done in turns so
    they overlap the FC compute (its variants b, c); here they are not overlapped (an upper bound
    on the step, by at most the FC compute)."""
    k = where.gpus
    if global_batch % k:
        raise ValueError(f"global batch {global_batch} is not divisible by {k} GPUs")
    links = where.links
    rows = global_batch // k
    if where.nodes > 1:  # one ring over every GPU: one flow leaves each node's NIC
        bw, lat, link = min(links.intra_bytes_s, links.inter_bytes_s), links.inter_latency_s, INTER
    else:
        bw, lat, link = links.intra_bytes_s, links.intra_latency_s, INTRA
    conv = {n: compute.seconds(net, n, rows, TOWERS) for n in CONV_LAYERS}
    fc = {n: compute.seconds(net, n, global_batch, TOWERS / k) for n in FC_LAYERS}
    gathered = [TOWERS * net.outputs[n] for n in ("conv5", "fc6", "fc7")]  # fc6's, fc7's, fc8's inputs
    gathers = [ring_allgather_s(global_batch * v * act_bytes, k, bw, lat) for v in gathered]
    fwd = sum(conv[n] * net.forward_share[n] for n in CONV_LAYERS) + sum(
        fc[n] * net.forward_share[n] for n in FC_LAYERS) + sum(gathers)
    fc_bwd = sum(fc[n] * (1 - net.forward_share[n]) for n in FC_LAYERS) + sum(gathers)
    conv_start = fwd + fc_bwd  # the conv backward starts; its gradients become final layer by layer
    clock, ready = conv_start, {}
    for n in reversed(CONV_LAYERS):
        clock += conv[n] * (1 - net.forward_share[n])
        ready[n] = clock
    end = clock
    sizes = [(n, net.layer_params(n)) for n in CONV_LAYERS]
    seconds = functools.partial(ring_allreduce_s, ranks=k, bytes_s=bw, latency_s=lat)
    bucket_list = buckets(sizes, bucket_bytes, grad_bytes)
    full = sum(seconds(nbytes) for nbytes, _ in bucket_list)
    finish = max(end, overlapped_end(bucket_list, ready, seconds))
    gpu_params = sum(net.layer_params(n) for n in CONV_LAYERS) + sum(net.layer_params(n) for n in FC_LAYERS) / k
    opt = gpu_params * OPTIMIZER_BYTES_PER_PARAM / compute.memory_bytes_s
    conv_params = sum(numel for _, numel in sizes)
    traffic = (
        Traffic("all-gather", link, 2 * (k - 1) / k * global_batch * sum(gathered) * act_bytes, 2 * sum(gathers)),
        Traffic("all-reduce", link, 2 * (k - 1) / k * conv_params * grad_bytes, full),
    )
    return Estimate("one weird trick", k, 1, 1, 1, rows, (LAYERS,), finish + opt,
                    sum(conv.values()) + sum(fc.values()), end, 0.0, 2 * sum(gathers), 0.0, full,
                    finish - end, opt, traffic)


# --- the input path: loader actors decode on each replica's stage-0 node (cluster/launch/loaders.py)

@dataclasses.dataclass(frozen=True)
class InputPath:
    """What feeds the GPUs: each replica's loaders decode on the node of its stage 0, on the CPU
    cores that node has beyond one per GPU actor."""

    name: str
    decode_images_s_per_core: float  # training images one core makes per second (crop, flip, lighting)
    cores_per_node: float  # CPU cores of a GPU node
    source: str


# One core's training images/s as a GPU node's loader makes them (decode, crop, flip, lighting; the
# GPU normalises), measured on this project's machine (AMD EPYC, bench/data_pipeline.py (c') and
# (d'), 2026-12-02, docs/BENCHMARKS.md), and the CPU cores of the GPU nodes deploy/cluster.yaml names:
# p4d.24xlarge, 96 vCPUs = 48 cores for 8 GPUs (hyper-threads counted as no extra core).
CORES_PER_NODE = 48
DECODE_FULL = InputPath("full-size shards", 1065.0, CORES_PER_NODE, "bench/data_pipeline.py (c'), one core")
DECODE_256 = InputPath("pre-resized 256 shards", 3625.0, CORES_PER_NODE, "bench/data_pipeline.py (d'), one core")
INPUT_PATHS = (DECODE_FULL, DECODE_256)

CROP = PAPER.image_size
IMAGE_BYTES = 3 * CROP * CROP  # one uint8 training image at the crop
LABEL_BYTES = 8  # an int64 label
LIGHTING_BYTES = 3 * 4  # its PCA colour offset, float32


def input_bytes(batch: int) -> dict:
    """Bytes per step per replica: what a loader puts into its node's object store (the images,
    their lighting offsets and labels, stored once; both tower actors of stage 0 read the same
    copy there), and what crosses the network: the labels, to the last stage when it is on
    another node. The images never leave their node."""
    return {"object_store": batch * (IMAGE_BYTES + LIGHTING_BYTES + LABEL_BYTES), "nic": batch * LABEL_BYTES}


def stage0_nodes(est: Estimate, where: Cluster) -> list[int]:
    """The node of each replica's stage 0, by the placement rule."""
    plan = place(est.replicas, est.stages, est.towers, where.nodes, where.gpus_per_node)
    return [replica[0] for replica in plan]


def input_bound_images_s(est: Estimate, where: Cluster, path: InputPath) -> float:
    """The global images/s the loaders can make: each node's spare cores (its cores less one per
    GPU actor on it) shared by the replicas whose stage 0 it holds; the step waits for the
    slowest replica, so the mesh makes R × the slowest replica's rate."""
    firsts = stage0_nodes(est, where)
    gpu_actors = [0] * where.nodes
    for replica in place(est.replicas, est.stages, est.towers, where.nodes, where.gpus_per_node):
        for node in replica:
            gpu_actors[node] += est.towers
    per_replica = []
    for node in set(firsts):
        spare = max(path.cores_per_node - gpu_actors[node], 0.0)
        per_replica.append(spare / firsts.count(node) * path.decode_images_s_per_core)
    return est.replicas * min(per_replica)


def cores_per_gpu(est: Estimate, path: InputPath) -> float:
    """Decoding cores each GPU needs to keep up with its compute-bound rate."""
    return est.images_s / est.gpus / path.decode_images_s_per_core


def describe(est: Estimate) -> str:
    """One line: shape, split, images/s and where the step goes."""
    split = " | ".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else s[0] for s in est.split)
    return (f"{est.shape():24} B={est.batch:<5} {est.images_s:10.0f} img/s  step {1e3 * est.step_s:8.2f} ms: "
            f"compute {1e3 * est.compute_s:.2f}, bubble {100 * est.bubble:.0f}% "
            f"(ideal {100 * ideal_bubble(est.stages, est.microbatches):.0f}%), exchange {1e3 * est.exchange_s:.2f}, "
            f"p2p {1e3 * est.p2p_s:.2f}, all-reduce {1e3 * est.allreduce_s:.2f} "
            f"(exposed {1e3 * est.allreduce_exposed_s:.2f}), optimizer {1e3 * est.optimizer_s:.2f}  [{split}]")

