"""Pipeline parallelism: S stages × 2 towers of real Ray actors, activations and gradients going
stage to stage through real gloo point-to-point, train like the single-process reference — every
step's loss, every weight and its update — for every schedule and microbatch count (tolerances:
tests/parity.py); the schedules hold the activations they promise; the trace is Chrome's format;
bad splits fail before any actor."""

import itertools
import json

import pytest
import torch

from cluster.launch.actor_mesh import ActorMesh
from cluster.config import ConfigError
from cluster.plan.schedule import expected_bubble, ideal_bubble, peak_in_flight, stage_actions
from cluster.rank.report import StepReport
from cluster.telemetry.timeline import step_summary, write_trace
from parity import (assert_evaluation_like, assert_gradients_like, assert_loss_close, assert_rel_close,
                    assert_trained_like, batches, one_mesh_at_a_time, reference_evaluation, reference_run,
                    replica_weights, small_config, train_mesh)
from stages.split import format_split, layer_costs, parse_split
from stages.tower import LAYERS

# S = 2 cut at the conv2|conv3 cross-connection: stage 1 starts with the all-gather of both
# towers' conv2 maps. S = 3 with the balanced split of the 63×63 test network, which cuts at two
# cross-connections (conv2|conv3 and fc6|fc7).
SPLITS = {1: "conv1-fc8", 2: "conv1-conv2 | conv3-fc8", 3: "conv1-conv2 | conv3-fc6 | fc7-fc8"}


@pytest.fixture(scope="module")
def meshes(local_ray):
    """The actor mesh of a given (stages, towers), one at a time."""
    def config(stages: int, towers: int = 2):
        return small_config(stages=stages, towers=towers, stage_split=SPLITS[stages])

    with one_mesh_at_a_time(config) as get:
        yield get


def test_default_split_is_the_most_balanced_one():
    config = small_config(image_size=224, resize=256, num_classes=1000)
    costs = layer_costs(config.model_config)
    for stages in (2, 3, 4):
        # brute force: every way to cut the 8 layers into `stages` runs
        best = min(max(sum(costs[n] for n in LAYERS[a:b]) for a, b in zip((0,) + cuts, cuts + (8,)))
                   for cuts in itertools.combinations(range(1, 8), stages - 1))
        split = config.replace(stages=stages).split
        assert max(sum(costs[n] for n in stage) for stage in split) == best
    # at 224×224, S = 2 cuts at the conv2|conv3 cross-connection (conv1 + conv2: 43% of the work)
    assert format_split(config.replace(stages=2).split) == "conv1-conv2 | conv3-fc8"


def test_time_balanced_split_is_measured_once_into_a_table():
    config = small_config(stages=3, stage_split="time", batch_size=8, microbatches=4)
    resolved = config.resolved_split()  # what the driver hands every actor
    assert len(parse_split(resolved.stage_split)) == 3
    assert resolved.split == parse_split(resolved.stage_split)


def check_every_schedule_and_microbatch_count(workers: ActorMesh) -> None:
    """GPipe and 1F1B with M = 1, 4, 8 train like the reference over 3 steps, and each stage held
    exactly as many microbatches as its schedule allows."""
    stages = workers.mesh.stages
    ref = reference_run(workers.config)
    for schedule in ("gpipe", "1f1b"):
        for m in (1, 4, 8):  # M = 1 < S: fewer microbatches than stages must not hang
            per_rank, losses, reports = train_mesh(workers, microbatches=m, schedule=schedule)
            assert_trained_like(replica_weights(per_rank, workers), losses, ref, f"S={stages} M={m} {schedule}")
            for report in reports:  # the actor's own count of microbatches held for backward
                s = report.stage
                bound = m if schedule == "gpipe" else min(stages - s, m)
                assert report.peak_in_flight == bound, (schedule, m, s)
            last = [r for r in reports if r.stage == stages - 1]
            assert all(abs(r.loss - last[0].loss) < 1e-6 for r in last)


# Tests run in file order; those needing the same mesh are neighbours, so each mesh starts once.

def test_one_stage_matches_the_reference(meshes):
    check_every_schedule_and_microbatch_count(meshes(1))


def test_two_stages_cut_at_conv2_conv3_match_the_reference(meshes):
    check_every_schedule_and_microbatch_count(meshes(2))


def test_pipeline_gradients_and_logits_match_the_reference(meshes):
    workers = meshes(2)
    ref = reference_run(workers.config)
    workers.reset(workers.config.seed)
    probes = workers.probe(*next(batches(workers.config, 1)), microbatches=4)
    last = [p for p in probes if p.stage == 1]  # tower 0's classes, then tower 1's
    assert_rel_close(torch.cat([p.logits for p in last], dim=1), ref.logits, "logits")
    for probe in last:
        assert_loss_close(probe.loss, ref.loss, f"rank {probe.rank}")
    assert_gradients_like({name: g for probe in probes for name, g in probe.grads.items()}, ref, "S=2 M=4")


def test_towers_in_one_process_pipeline_matches_the_reference(meshes):
    # the benchmark's layout: 2 stages, both towers in each actor (one tensor crosses the link)
    workers = meshes(2, towers=1)
    per_rank, losses, _ = train_mesh(workers, microbatches=4, schedule="1f1b")
    assert_trained_like(replica_weights(per_rank, workers), losses, reference_run(workers.config), "towers=1 S=2")


def test_1f1b_holds_fewer_activations_than_gpipe(meshes):
    workers = meshes(2)
    peak = {}
    for schedule in ("gpipe", "1f1b"):
        _, _, reports = train_mesh(workers, microbatches=8, schedule=schedule)
        peak[schedule] = max(r.peak_activation_bytes for r in reports if r.stage == 0)
    # stage 0 holds 8 microbatches' maps under GPipe, 2 under 1F1B (each microbatch the same size)
    assert peak["1f1b"] * 4 == peak["gpipe"], peak


def test_three_stages_cut_at_two_cross_connections_match_the_reference(meshes):
    check_every_schedule_and_microbatch_count(meshes(3))


def test_evaluation_through_the_pipeline_matches_the_reference(meshes):
    workers = meshes(3)
    images, labels, _ = next(batches(workers.config, 1))
    weights = torch.ones(labels.shape[0])
    weights[-1] = 0.0  # a padding row
    expected = reference_evaluation(workers.config, images, labels, weights)
    workers.reset(workers.config.seed)
    result = workers.evaluate(images, labels, weights, microbatches=4)
    assert_evaluation_like(result, expected, labels.shape[0] - 1, "S=3 M=4")


def test_trace_is_chrome_trace_json_with_one_track_per_actor(meshes, tmp_path):
    workers = meshes(3)
    images, labels, lighting = next(batches(workers.config, 1))
    reports = workers.train_step(images, labels, 0.01, lighting, microbatches=4, schedule="1f1b")
    path = write_trace(str(tmp_path / "trace" / "step.json"), reports, workers.mesh, step=1)
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert tracks == {r: f"rank {r}: stage {r // 2}, tower {r % 2}" for r in range(6)}
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(6))
    for e in spans:
        assert {"name", "cat", "ts", "dur", "pid", "tid"} <= e.keys() and e["dur"] >= 0 and e["ts"] >= 0
    # every actor computed 4 forwards and 4 backwards; stage 0 sent 4 activations, stage 2 none
    for rank in range(6):
        kinds = [e["cat"] for e in events if e.get("pid") == rank and e["ph"] != "M"]
        assert kinds.count("F") == 4 and kinds.count("B") == 4
        assert kinds.count("send") == (0 if rank >= 4 else 4)
    summary = step_summary(reports)
    assert 0.0 <= summary.bubble < 1.0 and len(summary.actors) == 6


def test_schedules_are_what_the_papers_describe():
    # GPipe: all forwards, then all backwards
    assert stage_actions("gpipe", 0, 2, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    # 1F1B, S = 3, M = 4: stage 0 warms up with 2 forwards, the last stage with none
    assert stage_actions("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1),
                                              ("B", 2), ("B", 3)]
    assert stage_actions("1f1b", 2, 3, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2),
                                              ("F", 3), ("B", 3)]
    assert stage_actions("1f1b", 0, 4, 1) == [("F", 0), ("B", 0)]  # M < S
    for s in range(4):
        assert peak_in_flight(stage_actions("1f1b", s, 4, 8)) == 4 - s
        assert peak_in_flight(stage_actions("gpipe", s, 4, 8)) == 8
    assert ideal_bubble(2, 8) == pytest.approx(1 / 9)
    for schedule in ("gpipe", "1f1b"):  # equal stages: the ideal
        assert expected_bubble(schedule, [1.0, 1.0], [2.0, 2.0], 8) == pytest.approx(1 / 9)
    # forward 1 | 2 and backward 2 | 1 (f + b equal): 1F1B lasts 3 + 3 + 7·3 = 27 units, GPipe
    # 3 + 7·2 + 3 + 7·2 = 34; each stage computes 8·3 = 24 of them
    assert expected_bubble("1f1b", [1.0, 2.0], [2.0, 1.0], 8) == pytest.approx(1 - 24 / 27)
    assert expected_bubble("gpipe", [1.0, 2.0], [2.0, 1.0], 8) == pytest.approx(1 - 24 / 34)


def test_step_bubble_is_idle_time_in_the_common_window():
    # two actors; the step runs from t = 100 (first start) to t = 110 (last flush)
    common = dict(replica=0, tower=0, images=8, seconds=10.0, exchange_s=0.0, exchange_bytes=0)
    reports = [StepReport(rank=0, stage=0, started=100.0, finished=109.0, compute_s=8.0, wait_s=1.0, peak_in_flight=2,
                          peak_activation_bytes=10, **common),
               StepReport(rank=1, stage=1, started=100.5, finished=110.0, compute_s=6.0, wait_s=3.5, peak_in_flight=1,
                          peak_activation_bytes=5, **common)]
    summary = step_summary(reports)
    assert summary.window_s == pytest.approx(10.0)
    assert [a.bubble for a in summary.actors] == pytest.approx([0.2, 0.4])
    assert summary.bubble == pytest.approx(0.3)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 10, "microbatches": 4}, "batch_size 10 must be divisible by microbatches 4"),
    ({"stages": 9}, "stages must be one of 1, 2, 3, 4, 5, 6, 7, 8, got 9: each stage holds at least one"),
    ({"stages": 2, "stage_split": "conv1-conv2 | conv4-fc8"}, "skips conv3"),
    ({"stages": 2, "stage_split": "conv1-conv3 | conv3-fc8"}, "repeats conv3"),
    ({"stages": 3, "stage_split": "conv1-conv2 | conv3-fc8"}, r"has 2 stage\(s\) but stages is 3"),
    ({"stages": 2, "stage_split": "conv1-conv2 | conv3-fc9"}, "'fc9' in .* is not a layer"),
    ({"schedule": "zero-bubble"}, "schedule must be one of 1f1b, gpipe, got 'zero-bubble'"),
])
def test_bad_pipeline_options_fail_on_construction(changes, message):
    with pytest.raises(ConfigError, match=message):
        small_config(**changes)


def test_parse_split_reads_the_table():
    assert parse_split("conv1-conv2 | conv3-conv5 | fc6-fc8") == (
        ("conv1", "conv2"), ("conv3", "conv4", "conv5"), ("fc6", "fc7", "fc8"))
    assert parse_split("conv1-fc7|fc8") == (("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"), ("fc8",))
