"""The scaling model's arithmetic (cluster/plan/scaling.py) against hand-computed cases: the parameter
count, the bytes of each kind of traffic, the ring formulas, the pipeline bubble, the buckets of
cluster/rank/gradsync.py, monotonicity in bandwidth, and the mesh enumeration against the placement rule
of cluster/plan/placement.py."""

import math

import pytest
import torch

from cluster.plan import scaling as sc
from cluster.rank.gradsync import GradientSync
from cluster.plan.mesh import Mesh
from cluster.plan.placement import Node, PlacementError, plan_placement
from cluster.plan.schedule import expected_bubble, ideal_bubble
from stages.config import ModelConfig
from stages.split import parse_split
from stages.tower import LAYERS, HalfTower

NET = sc.network()
FREE = sc.Links(math.inf, 0.0, math.inf, 0.0, "free")
EQUAL = sc.Measured({name: 0.8 for name in LAYERS}, rows=8)  # 0.1 s per image per half-layer


def test_parameters_are_the_papers():
    assert NET.total_params == 60_965_224
    # PAPER.md: 28,434,112 per tower without fc8, + 4,097,000 for fc8 (4096·1000 + 1000)
    for tower in (0, 1):
        assert sum(NET.params[(tower, n)] for n in LAYERS[:-1]) == 28_434_112
    assert NET.layer_params("fc8") == 4_097_000
    conv = sum(NET.layer_params(n) for n in sc.CONV_LAYERS)
    assert conv == 2 * (48 * 3 * 121 + 48 + 128 * 48 * 25 + 128 + 192 * 256 * 9 + 192 + 192 * 192 * 9 + 192
                        + 128 * 192 * 9 + 128) == 2_334_080
    # the 2012 code's fc8 lies wholly on tower 0
    code = sc.network(ModelConfig(variant="cuda-convnet-2012"))
    assert (code.params[(0, "fc8")], code.params[(1, "fc8")]) == (4_097_000, 0)


def test_cross_connection_bytes_come_from_the_shapes():
    # each tower sends its own input maps of the crossing layer: conv2's 128×13×13, pool5's
    # 128×6×6, fc6's 2048, fc7's 2048 values per image (and the same back as gradients)
    assert {n: NET.exchange_values(n) for n in ("conv3", "fc6", "fc7", "fc8")} == {
        "conv3": 128 * 13 * 13, "fc6": 128 * 6 * 6, "fc7": 2048, "fc8": 2048}
    assert NET.exchange_values("conv4") == 0 and NET.exchange_values("loss") == 2
    # BENCHMARKS.md: "about 16 MB per rank per direction per batch" of 128 at fp32
    per_direction = 128 * (21632 + 4608 + 2048 + 2048) * 4
    assert per_direction == 15_532_032
    where = sc.cluster(2, 1, sc.gpu_links(100))
    est = sc.mesh_step(NET, EQUAL, where, 1, 1, 2, 1, 128, (LAYERS,))
    assert est.traffic[0].kind == "exchange" and est.traffic[0].link == sc.INTRA
    assert est.traffic[0].bytes_per_gpu == 2 * (per_direction + 128 * 2 * 4)  # forward + backward, + loss
    one = sc.mesh_step(NET, EQUAL, sc.cluster(1, 1, sc.gpu_links(100)), 1, 1, 1, 1, 128, (LAYERS,))
    assert one.traffic[0].bytes_per_gpu == 0 and one.exchange_s == 0


def test_cut_bytes_are_the_boundary_shape():
    split = parse_split("conv1-conv2 | conv3-fc8")
    assert NET.cut_values(split, 0, 1) == 128 * 13 * 13  # one tower's pool2 maps
    assert NET.cut_values(split, 0, 2) == 2 * 128 * 13 * 13  # both towers in one process
    where = sc.cluster(4, 1, sc.gpu_links(100))
    est = sc.mesh_step(NET, EQUAL, where, 1, 2, 2, 4, 64, split)
    assert est.traffic[1].bytes_per_gpu == 64 * 21632 * 4 and est.traffic[1].link == sc.INTRA


def test_ring_formulas():
    # R = 4, 100 MB at 10 GB/s: 2·3/4·0.01 s = 15 ms, plus 2·3 hops of 10 µs
    assert sc.ring_allreduce_s(100e6, 4, 10e9, 10e-6) == pytest.approx(0.015 + 6 * 10e-6)
    assert sc.ring_allreduce_s(100e6, 1, 10e9, 10e-6) == 0.0
    # all-gather of 100 MB in all over 4: each rank receives 3/4 of it, 3 hops
    assert sc.ring_allgather_s(100e6, 4, 10e9, 10e-6) == pytest.approx(0.0075 + 3 * 10e-6)


def test_buckets_are_gradsyncs():
    """Same cut as cluster/rank/gradsync.py: last layer first, closed at 25 MiB."""
    with torch.device("meta"):
        tower = HalfTower(ModelConfig(), 0)
    real = [bucket.numel * 4 for bucket in GradientSync(tower.parameters(), None, 2).buckets]
    ours = sc.buckets([(n, NET.params[(0, n)]) for n in LAYERS], sc.BUCKET_BYTES, 4)
    assert [size for size, _ in ours] == real == [4 * 10_439_156, 4 * 18_876_416, 4 * 1_167_040]
    assert ours[0][1] == ["fc8", "fc7"]


def test_allreduce_on_two_nodes_without_overlap_is_the_ring_time():
    # one GPU per node, R = 2, towers = 1: one replica group holds the whole network (3 buckets)
    # and its ring crosses both nodes' NICs; no overlap: exposed = Σ ring(bucket)
    links = sc.gpu_links(100)
    where = sc.cluster(2, 2, links)
    est = sc.mesh_step(NET, EQUAL, where, 2, 1, 1, 1, 64, (LAYERS,), overlap=False)
    sizes = [size for size, _ in sc.buckets([(n, NET.params[(t, n)]) for t in (0, 1) for n in LAYERS],
                                            sc.BUCKET_BYTES, 4)]
    assert sum(sizes) == 60_965_224 * 4
    expected = sum(2 * 1 / 2 * size / (100e9 / 8) + 2 * 10e-6 for size in sizes)
    assert est.allreduce_s == pytest.approx(expected) and est.allreduce_exposed_s == pytest.approx(expected)
    assert est.traffic[2].link == sc.INTER
    overlapped = sc.mesh_step(NET, EQUAL, where, 2, 1, 1, 1, 64, (LAYERS,))
    assert 0 < overlapped.allreduce_exposed_s < est.allreduce_exposed_s
    assert est.step_s - overlapped.step_s == pytest.approx(est.allreduce_exposed_s - overlapped.allreduce_exposed_s)


@pytest.mark.parametrize("schedule", sc.SCHEDULES)
@pytest.mark.parametrize("split_text", ["conv1-conv4 | conv5-fc8", "conv1-conv2 | conv3-fc6 | fc7-fc8",
                                        "conv1 | conv2-conv5 | fc6-fc7 | fc8"])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_bubble_with_free_links_is_the_schedules(schedule, split_text, m):
    split = parse_split(split_text)
    stages = len(split)
    est = sc.mesh_step(NET, EQUAL, sc.Cluster(1, 2 * stages, FREE), 1, stages, 2, m, 8 * m, split, schedule=schedule)
    # per stage, per microbatch of 8: each half-layer 0.1 s per image; forward 1/2 (conv1) or 1/3
    f = [sum(0.8 * (0.5 if n == "conv1" else 1 / 3) for n in layers) for layers in split]
    b = [sum(0.8 for _ in layers) - fs for layers, fs in zip(split, f)]
    assert est.bubble == pytest.approx(expected_bubble(schedule, f, b, m))
    if schedule == "1f1b" and len({len(layers) for layers in split}) == 1:  # equal stages
        assert est.bubble == pytest.approx(ideal_bubble(stages, m))


def test_more_bandwidth_never_makes_a_step_slower():
    def step(kind, gpus, nodes, intra, inter, **shape):
        where = sc.Cluster(nodes, gpus // nodes, sc.Links(intra, 5e-6, inter, 10e-6))
        if kind == "owt":
            return sc.owt_step(NET, sc.H100_TF32, where, 1024).step_s
        return sc.best_mesh_step(NET, sc.H100_TF32, where, global_batch=1024, **shape).step_s

    cases = [("mesh", 32, 4, {"replicas": 16, "stages": 1, "towers": 2}),
             ("mesh", 32, 4, {"replicas": 2, "stages": 8, "towers": 2}),
             ("mesh", 16, 2, {"replicas": 1, "stages": 8, "towers": 2}),
             ("mesh", 8, 1, {"replicas": 4, "stages": 2, "towers": 1}),
             ("owt", 32, 4, {}), ("owt", 8, 1, {})]
    for kind, gpus, nodes, shape in cases:
        for intra in (25e9, 50e9, 360e9, 900e9):
            times = [step(kind, gpus, nodes, intra, gbit * sc.GBIT, **shape) for gbit in (10, 100, 400, 3200)]
            assert times == sorted(times, reverse=True), (kind, gpus, nodes, shape, intra, times)
        for gbit in (100, 400):
            times = [step(kind, gpus, nodes, intra, gbit * sc.GBIT, **shape) for intra in (25e9, 50e9, 360e9, 900e9)]
            assert times == sorted(times, reverse=True), (kind, gpus, nodes, shape, gbit, times)


def placement_nodes(nodes: int, gpus: int) -> list[Node]:
    return [Node(f"node{i:03d}", f"10.0.0.{i}", {"CPU": gpus, "GPU": gpus}) for i in range(nodes)]


@pytest.mark.parametrize("gpus, nodes", [(2, 1), (8, 1), (16, 2), (32, 4), (64, 8), (4, 4), (6, 3), (24, 3), (12, 2)])
def test_enumeration_is_exactly_what_placement_allows(gpus, nodes):
    per_node = gpus // nodes
    allowed = set()
    for towers in (1, 2):
        for stages in range(1, 9):
            if gpus % (stages * towers):
                continue
            mesh = Mesh(replicas=gpus // (stages * towers), stages=stages, towers=towers)
            try:
                plan = plan_placement(mesh, {"CPU": 1, "GPU": 1}, placement_nodes(nodes, per_node))
            except PlacementError:
                assert sc.place(mesh.replicas, stages, towers, nodes, per_node) is None
                continue
            allowed.add((mesh.replicas, stages, towers))
            # the same node for every (replica, stage)
            ours = sc.place(mesh.replicas, stages, towers, nodes, per_node)
            assert ours == [[int(n.node_id[4:]) for n in where] for where in plan]
    found = sc.meshes(gpus, nodes)
    assert len(found) == len(set(found)) and set(found) == allowed
    assert {(r, s) for r, s, t in found if t == 2} == {
        (gpus // (2 * s), s) for s in range(1, 9) if gpus % (2 * s) == 0 and per_node >= 2}


def test_placement_keeps_towers_together_packs_stages_and_spreads_replicas():
    # 32 GPUs on 4 nodes, R = 2, S = 8, T = 2: a replica fills two nodes
    assert sc.place(2, 8, 2, 4, 8) == [[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3, 3]]
    # R = 16, S = 1: four replicas per node, spread round the nodes
    assert sc.place(16, 1, 2, 4, 8) == [[n] for n in (0, 1, 2, 3) * 4]
    assert sc.place(1, 1, 2, 2, 1) is None  # a stage's two towers never split across nodes


def test_one_weird_trick_traffic():
    where = sc.cluster(8, 1, sc.gpu_links(100))
    est = sc.owt_step(NET, sc.H100_TF32, where, 1024)
    gathers, allreduce = est.traffic
    # pool5 (9216), fc6 and fc7 outputs (4096 each) of the global batch, forward and backward,
    # each GPU sending 7/8 of it round the ring
    assert gathers.bytes_per_gpu == pytest.approx(2 * 7 / 8 * 1024 * (9216 + 4096 + 4096) * 4)
    assert allreduce.bytes_per_gpu == pytest.approx(2 * 7 / 8 * 2_334_080 * 4)
    bw = 360e9
    assert gathers.seconds == pytest.approx(2 * sum(sc.ring_allgather_s(1024 * v * 4, 8, bw, 5e-6)
                                                    for v in (9216, 4096, 4096)))
    assert est.global_batch == 1024 and est.gpus == 8
    with pytest.raises(ValueError, match="global batch 1000 is not divisible by 16 GPUs"):
        sc.owt_step(NET, sc.H100_TF32, sc.cluster(16, 2, sc.gpu_links(100)), 1000)


def test_rank_meshes_puts_the_fastest_first():
    ranked = sc.rank_meshes(NET, sc.H100_TF32, sc.cluster(16, 2, sc.gpu_links(400)), 1024)
    assert [e.step_s for e in ranked] == sorted(e.step_s for e in ranked)
    assert {(e.replicas, e.stages, e.towers) for e in ranked} == {
        (r, s, t) for r, s, t in sc.meshes(16, 2) if 1024 % r == 0}
    assert all(e.gpus == 16 and e.global_batch == 1024 for e in ranked)


def test_the_input_path_is_the_spare_cores_of_each_replicas_first_node():
    path = sc.InputPath("test", 100.0, 48, "")
    where = sc.cluster(8, 1, sc.gpu_links(100))
    est = sc.mesh_step(NET, EQUAL, where, 4, 1, 2, 1, 32, (LAYERS,))  # 4 replicas × 2 towers on one node
    # 48 cores − 8 GPU actors = 40 spare, shared by the 4 replicas: 10 cores × 100 img/s each, × 4
    assert sc.input_bound_images_s(est, where, path) == pytest.approx(4000)
    assert sc.cores_per_gpu(est, path) == pytest.approx(est.images_s / 8 / 100)
    # 2 nodes, one replica of 8 stages: its stage 0's node alone decodes, 48 − 8 = 40 cores
    two = sc.cluster(16, 2, sc.gpu_links(100))
    pipeline = sc.mesh_step(NET, EQUAL, two, 1, 8, 2, 8, 64, next(sc.splits(8)))
    assert sc.input_bound_images_s(pipeline, two, path) == pytest.approx(4000)
    # a uint8 image at 224², its 3 lighting floats and its int64 label go into the object store once;
    # only the label leaves the node
    assert sc.input_bytes(32) == {"object_store": 32 * (150_528 + 12 + 8), "nic": 32 * 8}
