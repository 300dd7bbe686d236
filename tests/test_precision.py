"""Mixed precision (cluster/rank/precision.py) on the two-tower mesh: real actors, real gloo.

bf16 and fp16 runs match the single-process reference in the same precision, and stay near the
fp32 run; the weights and momentum stay fp32; what the towers exchange travels in the compute
dtype; fp16's loss scale skips a step with an inf gradient on every actor, halves, and comes back
with a resume. Checkpoints cross precisions both ways.

Tolerances (relative to the reference's largest |value|, as in tests/parity.py): in the same
precision, 1e-3 on the first step's gradients and on the weight updates (w − w0) after three steps
across a learning-rate drop; measured: at most 1e-4. The reference must split the batch into the
same microbatches: in bf16 a kernel's rounding depends on the rows it sees, and a whole-batch
reference differs by one bf16 step (2^-8) per gradient, which three steps on these random batches
grow to 12% of an update. Against the fp32 run the updates stay within 35% (bf16: 8 bits of
mantissa; measured 28% on conv1's weights, the layer with the smallest updates) and 35% (fp16: 11
bits at batches of 4, with loss scaling; measured 15% in one suite run and 26% in another, on fc7
and conv3: in one process fp16 steps repeat bit for bit, the cause across runs is not found).
"""

import re

import pytest
import torch

from cluster import faults
from cluster.driver import main

from cluster.launch.actor_mesh import ActorMesh
from cluster.rank.precision import DTYPES
from parity import batches, small_config
from stages.config import PAPER_FC_WIDTH
from stages.loss import cross_entropy_reference
from stages.optim import PaperSGD, Rates, set_rates
from stages.reference import TwoTowerAlexNet
from data.normalize import normalize_batch
from runs import assert_same_tensors, shard_tensors, tiny_run_args

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)

SAME_PRECISION = {"updates": 1e-3, "grads": 1e-3}
VS_FP32 = {"bf16": 0.35, "fp16": 0.35}  # measured: 0.28, and 0.15 to 0.26
# The tolerances of the runs below were measured on the paper's fc width and ε, and they keep both
# (tests/parity.py's narrow net at 10× the ε drifts further from fp32 in bf16 and fp16).
PAPER = dict(fc_width=PAPER_FC_WIDTH)
LRS = (0.01, 0.01, 0.001)


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / max(float(ref.abs().max()), 1e-12))


def reference(config, precision: str):
    """The single-process network in `precision`, its batch in the config's microbatches like the
    mesh's (rounding in bf16 depends on the rows a kernel sees): autocast around the forward, the
    loss in fp32, fp32 weights and the paper's update; fp16 scales the loss by the config's loss
    scale, as the mesh does (these steps' gradients stay finite: the test checks none was
    skipped). (first-step gradients, updates after len(LRS) steps)."""
    net = TwoTowerAlexNet(config.model_config, seed=config.seed)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = PaperSGD(net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    first = None
    scale = config.loss_scale if precision == "fp16" else 1.0
    for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS):
        opt.zero_grad()
        rows = config.microbatch_size
        for part, targets, shift in zip(images.split(rows), labels.split(rows), lighting.split(rows)):
            with torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32"):
                logits = net(normalize_batch(part, lighting=shift))
            (cross_entropy_reference(logits.float(), targets) / config.microbatches * scale).backward()
        for p in net.parameters():
            p.grad /= scale
        if first is None:
            first = {n: p.grad.clone() for n, p in net.named_parameters()}
        set_rates(opt, Rates(lr))
        opt.step()
    return first, {n: p.detach() - start[n] for n, p in net.named_parameters()}


# fp16 has no fast CPU kernels in PyTorch (its matmul and convolution backward run ~10× slower than
# fp32's): its runs take batches of 4, next to an fp32 run of the same batches.
RUNS = {"fp32": ("fp32", 8), "bf16": ("bf16", 8), "fp32/4": ("fp32", 4), "fp16": ("fp16", 4)}
BASELINE = {"bf16": "fp32", "fp16": "fp32/4"}


@pytest.fixture(scope="module")
def runs(local_ray):
    """Per run of RUNS: the mesh's first-step gradients, its updates after three steps, the reports
    of its steps, and its parameters' and momentum's dtypes."""
    found = {}
    for key, (precision, batch) in RUNS.items():
        # fp16: the initial loss scale 2^10 (2^16 overflows these random batches' first gradients)
        config = small_config(**PAPER, towers=2, microbatches=2, batch_size=batch, precision=precision,
                              loss_scale=1024.0)
        with ActorMesh.take(config) as workers:
            images, labels, lighting = next(batches(config, 1))
            grads = {n: g for probe in workers.probe(images, labels, lighting) for n, g in probe.grads.items()}
            workers.reset(config.seed)
            start = {n: w for params in workers.named_parameters() for n, w in params.items()}
            reports = [workers.train_step(images, labels, lr, lighting)
                       for (images, labels, lighting), lr in zip(batches(config, len(LRS)), LRS)]
            after = {n: w for params in workers.named_parameters() for n, w in params.items()}
            dtypes = workers._gather([actor.__ray_call__.remote(
                lambda w: sorted({str(t.dtype) for t in [*w.model.parameters(),
                                                         *(s["velocity"] for s in w.optimizer.state.values())]}))
                for actor in workers.actors])
        found[key] = (grads, {n: after[n] - start[n] for n in after}, reports, dtypes, config)
    return found


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_mesh_matches_the_reference_in_the_same_precision(runs, precision):
    grads, updates, reports, _, config = runs[precision]
    first, expected = reference(config, precision)
    assert grads.keys() == first.keys() == updates.keys() == expected.keys()
    for name in first:
        assert max_rel(grads[name], first[name]) <= SAME_PRECISION["grads"], name
        assert max_rel(updates[name], expected[name]) <= SAME_PRECISION["updates"], name
    assert not any(r.skipped for step in reports for r in step)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_run_stays_near_the_fp32_run(runs, precision):
    fp32, mixed = runs[BASELINE[precision]][1], runs[precision][1]
    for name in fp32:
        assert max_rel(mixed[name], fp32[name]) <= VS_FP32[precision], name
    assert any(max_rel(mixed[name], fp32[name]) > 0 for name in fp32)  # it did compute in another dtype


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_weights_and_momentum_stay_fp32_and_the_towers_exchange_the_compute_dtype(runs, precision):
    _, _, reports, dtypes, _ = runs[precision]  # fp32: its run of 8
    assert dtypes == [["torch.float32"]] * 2  # each actor: parameters and velocities
    compute = str(DTYPES[precision]).removeprefix("torch.")
    for step in reports:
        for r in step:  # activations forward, their gradients backward: in the compute dtype only
            assert r.precision == precision and r.exchange_dtypes == [compute], r


SCALE = re.compile(r"^step (\d+)/\d+ .*\| loss scale (\S+), skipped (\d+)", re.MULTILINE)


def fp16_run(demo, run_dir, capsys, *extra) -> dict[int, tuple[float, int]]:
    """An fp16 run's loss scale and skipped count after each step, from its progress lines."""
    assert main(tiny_run_args(demo, run_dir, "--precision", "fp16", "--loss-scale", "1024", "--log-every", "1",
                              "--checkpoint-every", "1", "--batch-size", "2", *extra)) == 0  # fp16 is slow on CPUs
    out = capsys.readouterr().out
    return {int(step): (float(scale), int(skipped)) for step, scale, skipped in SCALE.findall(out)}


def test_an_inf_gradient_skips_that_step_on_every_actor_and_halves_the_scale(tiny_demo, tmp_path, capsys,
                                                                              monkeypatch, shared_ray):
    # rank 1 (tower 1) finds an inf in a gradient of step 3: both towers skip it, the scale halves
    monkeypatch.setenv(faults.INF_GRAD_ENV, "1:3")
    scales = fp16_run(tiny_demo, tmp_path / "run", capsys, "--max-steps", "4")
    assert scales == {1: (1024.0, 0), 2: (1024.0, 0), 3: (512.0, 1), 4: (512.0, 1)}, scales
    before, after = (shard_tensors(tmp_path / "run" / f"checkpoint-{s:08d}") for s in (2, 3))
    weights = [name for name in before if not name.endswith(":rng")]
    assert weights and all(torch.equal(before[name], after[name]) for name in weights)  # nothing moved
    moved = shard_tensors(tmp_path / "run" / "checkpoint-00000004")
    assert any(not torch.equal(after[name], moved[name]) for name in weights)  # and the run goes on


def test_a_resumed_fp16_run_goes_on_with_its_loss_scale(tiny_demo, tmp_path, capsys, monkeypatch, shared_ray):
    monkeypatch.setenv(faults.INF_GRAD_ENV, "0:2")  # the scale drops to 512 at step 2
    straight = fp16_run(tiny_demo, tmp_path / "straight", capsys, "--max-steps", "4")
    fp16_run(tiny_demo, tmp_path / "run", capsys, "--max-steps", "3")
    monkeypatch.delenv(faults.INF_GRAD_ENV)
    resumed = fp16_run(tiny_demo, tmp_path / "run", capsys, "--max-steps", "4")
    assert resumed[4] == (512.0, 0) and straight[4] == (512.0, 1)  # the scale came back; the count is this attempt's
    assert_same_tensors(*(shard_tensors(tmp_path / name / "checkpoint-00000004") for name in ("straight", "run")))


@pytest.mark.parametrize("first, then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_checkpoints_cross_precisions(tiny_demo, tmp_path, capsys, shared_ray, first, then):
    assert main(tiny_run_args(tiny_demo, tmp_path / "run", "--precision", first, "--max-steps", "2")) == 0
    assert main(tiny_run_args(tiny_demo, tmp_path / "run", "--precision", then, "--max-steps", "4")) == 0
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'run' / 'checkpoint-00000002'}" in out and f"precision: {then}" in out
    for step in (2, 4):  # whatever the run computed in, its checkpoints hold fp32
        tensors = shard_tensors(tmp_path / "run" / f"checkpoint-{step:08d}")
        assert {t.dtype for name, t in tensors.items() if not name.endswith(":rng")} == {torch.float32}


def test_pipeline_stages_send_in_the_compute_dtype(local_ray):
    config = small_config(stages=2, stage_split="conv1-conv2 | conv3-fc8", microbatches=2, precision="bf16")
    with ActorMesh.take(config) as workers:
        images, labels, lighting = next(batches(config, 1))
        reports = workers.train_step(images, labels, 0.01, lighting)
    # stage 0 sends conv2's maps forward, stage 1 their gradients back: bf16 both ways
    assert [r.sent_dtypes for r in reports] == [["bfloat16"]] * 4
    assert [r.exchange_dtypes for r in reports] == [[], [], ["bfloat16"], ["bfloat16"]]  # conv3 on: stage 1


def test_a_bf16_gradient_all_reduce_halves_its_bytes(local_ray):
    """Two replicas averaging fp32 gradients through bf16 buckets: half the bytes, and the updates
    within 2% of the fp32 all-reduce's after three steps (the averages are rounded to bf16 once a
    step; measured: under 1%)."""
    updates, sent = {}, {}
    for dtype in ("fp32", "bf16"):
        config = small_config(**PAPER, replicas=2, batch_size=4, grad_reduce_dtype=dtype)
        with ActorMesh.take(config) as workers:
            start = {n: w for params in workers.named_parameters() for n, w in params.items()}
            for (images, labels, lighting), lr in zip(batches(small_config(batch_size=8), len(LRS)), LRS):
                reports = workers.train_step(list(images.split(4)), list(labels.split(4)), lr,
                                             list(lighting.split(4)))
            after = {n: w for params in workers.named_parameters() for n, w in params.items()}
        updates[dtype] = {n: after[n] - start[n] for n in after}
        sent[dtype] = sum(r.allreduce_bytes for r in reports)
    assert sent["bf16"] * 2 == sent["fp32"] > 0
    for name, fp32 in updates["fp32"].items():
        assert max_rel(updates["bf16"][name], fp32) <= 0.02, name
