"""Data parallelism: R replicas × S stages × 2 towers of real Ray actors, gradients averaged by
real gloo all-reduces (bucketed, launched during backward), train like the single-process
reference on the same global batch — every step's loss, every weight and its update, on every
replica (tolerances: tests/parity.py); the
placement plan keeps towers together, packs stages, spreads replicas and says what is missing."""

import pytest
import torch

from cluster.launch import localnet
from cluster.launch.actor_mesh import ActorMesh
from cluster.config import ConfigError
from cluster.plan.mesh import Mesh
from cluster.plan.placement import Node, PlacementError, plan_placement
from parity import (LRS, assert_gradients_like, assert_trained_like, batches, one_mesh_at_a_time, reference_run,
                    replica_weights, small_config, train_mesh)

SPLIT = {1: "conv1-fc8", 2: "conv1-conv2 | conv3-fc8"}


@pytest.fixture(scope="module")
def meshes(local_ray):
    """One live mesh at a time (the largest is 2 × 2 × 2); `reset` gives fresh weights."""
    with one_mesh_at_a_time(lambda **changes: small_config(stage_split=SPLIT[changes.get("stages", 1)],
                                                              **changes)) as get:
        yield get


def global_config(workers: ActorMesh):
    """The single-process reference's configuration: one replica reading the global batch."""
    config = workers.config
    return config.replace(replicas=1, stages=1, stage_split="conv1-fc8", batch_size=config.global_batch)


def per_replica(tensor: torch.Tensor, replicas: int) -> list[torch.Tensor]:
    """The global batch dealt to the replicas: replica r takes rows r, r + R, r + 2R, ... (the
    reader's round-robin; any disjoint split gives the same average)."""
    return [tensor[r::replicas].contiguous() for r in range(replicas)]


def train_replicas(workers: ActorMesh, microbatches: int) -> tuple[list, list[float], list]:
    """`train_mesh` on the global batches, each dealt to the replicas."""
    replicas = workers.mesh.replicas
    feed = [tuple(per_replica(tensor, replicas) for tensor in batch)
            for batch in batches(global_config(workers), len(LRS))]
    return train_mesh(workers, feed, microbatches=microbatches)


@pytest.mark.parametrize("replicas, stages", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_replicas_train_to_the_reference_on_the_global_batch(meshes, replicas, stages):
    workers = meshes(replicas=replicas, stages=stages)
    ref = reference_run(global_config(workers))
    for microbatches in (1, 2):
        per_rank, losses, reports = train_replicas(workers, microbatches)
        for replica in range(replicas):  # every replica holds the whole network's weights
            assert_trained_like(replica_weights(per_rank, workers, replica), losses, ref,
                                f"R={replicas} S={stages} M={microbatches} replica {replica}")
        if replicas > 1:
            assert all(r.allreduce_bytes > 0 for r in reports)


@pytest.mark.parametrize("changes", [dict(stages=2, bucket_mb=0.01, overlap_allreduce="on"),
                                     dict(stages=1, overlap_allreduce="off")],
                         ids=["small-buckets", "no-overlap"])
def test_small_buckets_and_reduction_after_backward_give_the_same_weights(meshes, changes):
    """Many buckets (each layer's weight its own) launched in order during backward, and the
    no-overlap baseline, both reach the reference."""
    workers = meshes(replicas=2, **changes)
    per_rank, losses, _ = train_replicas(workers, microbatches=2)
    assert_trained_like(replica_weights(per_rank, workers), losses, reference_run(global_config(workers)),
                        str(changes))


def test_probe_gives_the_global_batch_gradient_and_placement_is_reported(meshes):
    workers = meshes(replicas=2, stages=1)
    workers.reset(workers.config.seed)
    ref = reference_run(global_config(workers))
    images, labels, lighting = next(batches(global_config(workers), 1))
    reports = workers.probe(per_replica(images, 2), per_replica(labels, 2), per_replica(lighting, 2))
    for replica in range(2):  # every replica's ranks hold the global batch's (averaged) gradients
        assert_gradients_like({name: g for report in reports if report.replica == replica
                               for name, g in report.grads.items()}, ref, f"replica {replica}")
    table = workers.placement_table().splitlines()
    assert table[0].split() == ["rank", "replica", "stage", "tower", "node", "address", "GPU", "CPUs", "pid"]
    assert [line.split()[:4] for line in table[1:]] == [["0", "0", "0", "0"], ["1", "0", "0", "1"],
                                                        ["2", "1", "0", "0"], ["3", "1", "0", "1"]]
    assert all(line.split()[5] == localnet.LOOPBACK for line in table[1:])


def test_one_input_for_a_two_replica_mesh_is_refused(meshes):
    workers = meshes(replicas=2, stages=1)
    images, labels, lighting = next(batches(workers.config, 1))
    with pytest.raises(ValueError, match="the mesh has 2 replicas: pass one input per replica"):
        workers.train_step(images, labels, 0.01, lighting)


# --- the placement plan (pure: nodes and their free resources in, a node per (replica, stage) out)

def nodes(*cpus: float, **extra) -> list[Node]:
    return [Node(f"node{i}", f"10.0.0.{i}", {"CPU": c, **extra.get(f"node{i}", {})}) for i, c in enumerate(cpus)]


def node_ids(plan) -> list[list[str]]:
    return [[n.node_id for n in stages] for stages in plan]


def test_replicas_spread_over_nodes_and_stages_pack():
    mesh = Mesh(replicas=2, stages=2, towers=2)
    # four 4-CPU nodes: each replica (2 stages × 2 towers × 1 CPU) packs onto one node, the two
    # replicas onto different nodes
    assert node_ids(plan_placement(mesh, {"CPU": 1}, nodes(4, 4, 4, 4))) == [["node0", "node0"], ["node1", "node1"]]
    # 2-CPU nodes hold one stage (both towers) each: a replica's stages spill to a second node
    assert node_ids(plan_placement(mesh, {"CPU": 1}, nodes(2, 2, 2, 2))) == [["node0", "node1"], ["node2", "node3"]]
    # one big node holds everything
    assert node_ids(plan_placement(mesh, {"CPU": 1}, nodes(8))) == [["node0", "node0"], ["node0", "node0"]]


def test_the_two_towers_of_a_stage_never_split_across_nodes():
    # two nodes of 1 CPU each could hold two 1-CPU actors, but not a stage's two towers together
    with pytest.raises(PlacementError, match=r"replica 0 stage 0 needs \{CPU: 2\} on one node \(its 2 tower "
                                             r"actor\(s\) together\) and no node has it free \(10.0.0.0 node0: "
                                             r"\{CPU: 1\}; 10.0.0.1 node1: \{CPU: 1\}\)"):
        plan_placement(Mesh(replicas=1, stages=1, towers=2), {"CPU": 1}, nodes(1, 1))


def test_stage_resources_pin_stages_to_labelled_nodes():
    cluster = nodes(4, 4, 4, node2={"bigmem": 1})
    plan = plan_placement(Mesh(replicas=1, stages=2, towers=2), {"CPU": 1}, cluster, {1: "bigmem"})
    assert node_ids(plan) == [["node0", "node2"]]
    with pytest.raises(PlacementError, match=r"replica 1 stage 1 needs \{CPU: 2, bigmem: 0.01\}"):
        plan_placement(Mesh(replicas=2, stages=2, towers=2), {"CPU": 1}, nodes(4, 4, node1={"bigmem": 0.01}),
                       {1: "bigmem"})


def test_bad_mesh_and_data_parallel_options_fail_before_any_actor():
    with pytest.raises(ConfigError, match=r"replicas must be in 1..1024, got 0"):
        small_config(replicas=0)
    with pytest.raises(ConfigError, match="stage_resources must be STAGE=RESOURCE items with STAGE in 0..1"):
        small_config(stages=2, stage_split="conv1-conv2 | conv3-fc8", stage_resources="2=ssd")
    with pytest.raises(ConfigError, match="overlap_allreduce must be one of auto, on, off, got 'yes'"):
        small_config(overlap_allreduce="yes")
    with pytest.raises(ConfigError, match="lr_scaling must be one of linear, none, got 'sqrt'"):
        small_config(lr_scaling="sqrt")
    config = small_config(replicas=4, batch_size=64, lr=0.01)
    assert config.global_batch == 256 and config.scaled_lr == pytest.approx(0.02)  # 0.01 per 128 images
    assert config.replace(lr_scaling="none").scaled_lr == 0.01


def test_replica_readers_deal_disjoint_equal_shares_of_every_epoch(tiny_demo):
    """Each replica reads its own share of an epoch, the same number of batches, no sample twice;
    between them every sample but the remainder of a global batch (60 images, 3 × 8 per step).
    The loaders take their replica's reader from replica 0's (the index built once)."""
    from cluster.inputs import InputPlan
    from data.loader import ShardBatches

    settings = dict(train=True, seed=0, resize=72, crop=64, num_classes=10, replicas=3)
    plan = InputPlan(ShardBatches(tiny_demo.train_pattern, 8, **settings))
    readers = [plan.reader.for_replica(r) for r in range(3)]  # what each replica's loaders hold
    assert plan.batches_per_epoch == 60 // 24
    built = ShardBatches(tiny_demo.train_pattern, 8, replica=2, **settings)  # the same as building replica 2's
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
               for a, b in zip(readers[2].epoch_batches(0), built.epoch_batches(0)))
    assert readers[2].state_dict(0, 1) == built.state_dict(0, 1)
    for epoch in (0, 1):
        seen = []
        for b in range(plan.batches_per_epoch):
            parts = [reader.batch(epoch, b) for reader in readers]
            assert all(part.images.shape[0] == 8 for part in parts)
            seen.extend(int(i) for part in parts for i in part.indices)
        assert len(seen) == len(set(seen)) == 48
    # a loader asked for batch 1 first (a checkpoint's position) makes what an epoch's pass does
    fresh = plan.reader.for_replica(1)
    assert torch.equal(fresh.batch(1, 1).images, list(readers[1].epoch_batches(1))[1].images)
    assert plan.check_state(plan.state_dict(1, 1)) == (1, 1)
