"""Export: the grouped network computes the two-tower reference's function; `python -m
cluster.export` turns a real actor mesh's checkpoint into one state dict whose networks give the
distributed run's logits; a missing, incomplete, corrupt or inconsistent checkpoint is one line
and exit status 2.

Tolerance (tests/parity.py): max|ours − reference| ≤ 1e-5 · max|reference|, fp32. The grouped
network multiplies the same weights by the same inputs; what remains is summation order — a
grouped convolution or a convolution with twice the output channels may be blocked differently
by the CPU kernels than the towers' two half-width ones (measured: ~6e-7 relative at 63×63), and
the distributed run's logits come from other processes.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from cluster import export
from cluster.ckpt import checkpoint
from cluster.ckpt.consolidate import load_export
from cluster.launch.actor_mesh import ActorMesh
from data.transforms import normalize_batch
from parity import assert_rel_close, batches, small_config
from serving import one_line_error
from stages.config import ModelConfig
from stages.grouped import GroupedAlexNet, from_grouped, grouped_from_state, grouped_keys, to_grouped
from stages.reference import TwoTowerAlexNet
from stages.tower import HalfTower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("paper", "cuda-convnet-2012")

# The paper's network as one network (PAPER.md table, both towers): tower 0's rows first.
PAPER_GROUPED = {
    "conv1.weight": (96, 3, 11, 11), "conv1.bias": (96,),     # 2 × 48, both read the image
    "conv2.weight": (256, 48, 5, 5), "conv2.bias": (256,),    # 2 × 128, groups=2: own 48 maps
    "conv3.weight": (384, 256, 3, 3), "conv3.bias": (384,),   # 2 × 192, both towers' 256 maps
    "conv4.weight": (384, 192, 3, 3), "conv4.bias": (384,),   # groups=2
    "conv5.weight": (256, 192, 3, 3), "conv5.bias": (256,),   # groups=2
    "fc6.weight": (4096, 9216), "fc6.bias": (4096,),          # 9216 = 256 × 6 × 6
    "fc7.weight": (4096, 4096), "fc7.bias": (4096,),
    "fc8.weight": (1000, 4096), "fc8.bias": (1000,),
}


def images_and_input(size: int, rows: int, seed: int = 7) -> torch.Tensor:
    """Mean-subtracted random images: the network's real input range (about ±128)."""
    g = torch.Generator().manual_seed(seed)
    return normalize_batch(torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=g))


# --- the grouped network on its own

def test_grouped_names_shapes_and_parameter_count_are_the_papers():
    cfg = ModelConfig()
    assert grouped_keys(cfg) == PAPER_GROUPED  # names, shapes and order
    with torch.device("meta"):
        reference = TwoTowerAlexNet(cfg)
    assert sum(torch.Size(s).numel() for s in PAPER_GROUPED.values()) == 60_965_224
    assert sum(p.numel() for p in reference.parameters()) == 60_965_224
    # the 2012 code's fc8 is wholly tower 0's: the same (1000, 4096) weight
    assert grouped_keys(ModelConfig(variant="cuda-convnet-2012")) == PAPER_GROUPED


def reference_with_working_lrn(cfg: ModelConfig, seed: int) -> TwoTowerAlexNet:
    """The reference with conv1 and conv2 weights ×10. At the N(0, 0.01) init the LRN sums are
    tiny against k = 2 and LRN is nearly the identity (mixing the towers' maps there moves the
    logits by ~3e-6, under the tolerance); ×10 puts it in the range a trained net's maps reach,
    where it moves them by ~2e-3."""
    net = TwoTowerAlexNet(cfg, seed=seed).eval()
    with torch.no_grad():
        for tower in net.towers:
            for layer in ("conv1", "conv2"):
                tower.layers[layer].conv.weight.mul_(10)
    return net


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lrn_impl", ("fast", "torch"))
def test_grouped_network_computes_the_reference_function(variant, lrn_impl):
    # 63×63: maps 15/7/3/1, every layer (and both LRNs, and the 2012 code's rnorm) still there
    cfg = ModelConfig(variant=variant, num_classes=10, image_size=63, dropout=0.0, lrn_impl=lrn_impl)
    reference = reference_with_working_lrn(cfg, seed=3)
    grouped = GroupedAlexNet(cfg).eval()
    grouped.load_state_dict(to_grouped(reference.state_dict(), cfg))
    x = images_and_input(63, rows=4)
    with torch.no_grad():
        assert_rel_close(grouped(x), reference(x), f"{variant} {lrn_impl}: grouped logits")


@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_network_computes_the_reference_function_at_224(variant):
    cfg = ModelConfig(variant=variant)
    reference = reference_with_working_lrn(cfg, seed=1)
    grouped = grouped_from_state(to_grouped(reference.state_dict(), cfg), cfg)
    x = images_and_input(224, rows=2)
    with torch.no_grad():
        assert_rel_close(grouped(x), reference(x), f"{variant} at 224: grouped logits")


@pytest.mark.parametrize("layer", ("conv1", "conv2"))
def test_an_lrn_across_both_towers_would_differ(layer):
    """The checks above can fail: LRN over all 96 (or 256) maps at once, tower 0's last maps
    seeing tower 1's first, is another function."""
    cfg = ModelConfig(num_classes=10, image_size=63, dropout=0.0)
    reference = reference_with_working_lrn(cfg, seed=3)
    grouped = grouped_from_state(to_grouped(reference.state_dict(), cfg), cfg)
    grouped.after[layer].lrn = grouped.after[layer].lrn.module  # undo the per-tower LRN
    x = images_and_input(63, rows=4)
    with torch.no_grad(), pytest.raises(AssertionError, match="max error"):
        assert_rel_close(grouped(x), reference(x), f"{layer}: LRN across both towers")


@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_round_trips_exactly(variant):
    cfg = ModelConfig(variant=variant, num_classes=10, image_size=63)
    state = TwoTowerAlexNet(cfg, seed=2).state_dict()
    back = from_grouped(to_grouped(state, cfg), cfg)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name
    with pytest.raises(KeyError, match="missing"):
        to_grouped({k: v for k, v in state.items() if "fc8" not in k}, cfg)


# --- checkpoints written by hand (no Ray): the shard format of cluster/rank/worker.py `save`

def write_checkpoint(run_dir, step: int, shards: list[tuple[list[int], dict]]) -> str:
    """A complete checkpoint of `shards` [(coord, model state)] of `small_config()`, as the actors
    and cluster/trainer.py's Checkpointer write it."""
    config = small_config()
    directory = checkpoint.checkpoint_dir(str(run_dir), step)
    os.makedirs(directory)
    paths = []
    for rank, (coord, model) in enumerate(shards):
        path = os.path.join(directory, checkpoint.shard_file(rank))
        torch.save({checkpoint.SHARD_MODEL: model, checkpoint.SHARD_OPTIMIZER: {}, checkpoint.SHARD_COORD: coord,
                    checkpoint.SHARD_RNG: torch.get_rng_state()}, path)
        paths.append(path)
    checkpoint.write_manifest(directory, step=step, epoch=0, config=config.to_dict(),
                              mesh=dataclasses.asdict(config.mesh), shard_paths=paths, loader={})
    return directory


def tower_shards(seed: int = 0) -> list[tuple[list[int], dict]]:
    """One stage, two towers: each rank holds one whole tower."""
    cfg = small_config().model_config
    return [([0, 0, t], HalfTower(cfg, t, seed=seed).state_dict()) for t in range(2)]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    status = export.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(capsys, args: tuple, *phrases: str) -> None:
    """`python -m cluster.export *args` exits 2 with one line on stderr naming each phrase."""
    status, _, err = run_cli(capsys, *args)
    assert status == 2
    line = one_line_error(err)
    for phrase in phrases:
        assert phrase in line, line


def test_export_of_a_hand_written_checkpoint_holds_its_weights(tmp_path, capsys):
    write_checkpoint(tmp_path / "run", 3, tower_shards(seed=1))
    status, out, _ = run_cli(capsys, tmp_path / "run", tmp_path / "model.pt")
    assert status == 0 and "step 3" in out and "parameters" in out
    cfg = small_config().model_config
    expected = to_grouped(TwoTowerAlexNet(cfg, seed=1).state_dict(), cfg)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert type(saved) is dict and list(saved) == list(expected)
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.items())
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_the_newest_checkpoint_that_verifies_is_exported(tmp_path, capsys):
    write_checkpoint(tmp_path / "run", 1, tower_shards(seed=1))
    newest = write_checkpoint(tmp_path / "run", 2, tower_shards(seed=2))
    os.remove(os.path.join(newest, checkpoint.MANIFEST))  # stopped before its manifest: incomplete
    newer = write_checkpoint(tmp_path / "run", 3, tower_shards(seed=3))
    with open(os.path.join(newer, checkpoint.shard_file(1)), "r+b") as f:  # corrupt one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    status, out, err = run_cli(capsys, tmp_path / "run", tmp_path / "model.pt")
    assert status == 0 and "step 1" in out
    assert "skipped a newer checkpoint" in err and "sha256" in err
    with open(tmp_path / "model.json") as f:
        assert json.load(f)["step"] == 1


def test_no_checkpoint_is_exit_2_and_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert_one_line_error(capsys, (tmp_path / "run", tmp_path / "m.pt"), "no complete checkpoint")
    assert_one_line_error(capsys, (tmp_path / "nowhere", tmp_path / "m.pt"), "not a directory")
    directory = write_checkpoint(tmp_path / "run", 4, tower_shards())
    os.remove(os.path.join(directory, checkpoint.MANIFEST))
    assert_one_line_error(capsys, (directory, tmp_path / "m.pt"), "incomplete")
    assert not os.path.exists(tmp_path / "m.pt")


def test_a_corrupt_shard_is_exit_2_and_one_line(tmp_path, capsys):
    directory = write_checkpoint(tmp_path / "run", 5, tower_shards())
    with open(os.path.join(directory, checkpoint.shard_file(0)), "ab") as f:
        f.write(b"\0")
    assert_one_line_error(capsys, (tmp_path / "run", tmp_path / "m.pt"), "no checkpoint", "bytes")
    assert_one_line_error(capsys, (directory, tmp_path / "m.pt"), "rank00000.pt", "bytes")
    assert not os.path.exists(tmp_path / "m.pt")


def test_a_layer_missing_or_held_twice_is_exit_2(tmp_path, capsys):
    (tower0, state0), (tower1, state1) = tower_shards()
    no_fc8 = {k: v for k, v in state1.items() if ".fc8." not in k}
    missing = write_checkpoint(tmp_path / "a", 1, [(tower0, state0), (tower1, no_fc8)])
    assert_one_line_error(capsys, (missing, tmp_path / "m.pt"), "missing ['towers.1.layers.fc8']")
    twice = write_checkpoint(tmp_path / "b", 1, [(tower0, state0), (tower1, state1), ([0, 0, 1], state1)])
    assert_one_line_error(capsys, (twice, tmp_path / "m.pt"), "in both rank00001.pt and rank00002.pt")


def test_the_module_runs_as_a_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.export", str(tmp_path), str(tmp_path / "m.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr


# --- end to end: real actors train, checkpoint, and the export gives their logits

# (mesh, variant): 2 stages × 2 tower actors cut at the conv2|conv3 cross-connection; and
# 2 stages × 1 actor holding both towers, cut inside the fully connected layers, 2012 variant
# (fc8 wholly on tower 0).
LAYOUTS = {
    "2x2-paper": dict(stages=2, towers=2, stage_split="conv1-conv2 | conv3-fc8"),
    "2x1-cuda-convnet-2012": dict(stages=2, towers=1, stage_split="conv1-fc6 | fc7-fc8", variant="cuda-convnet-2012"),
}


@dataclasses.dataclass
class TrainedRun:
    config: object
    run_dir: str
    checkpoint: str
    input: torch.Tensor  # the normalised batch the logits are of
    logits: torch.Tensor  # the distributed run's, tower 0's classes first


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def trained_run(request, local_ray, tmp_path_factory) -> TrainedRun:
    """Train 2 steps on a real actor mesh, checkpoint as cluster/trainer.py does, and take the
    mesh's logits of a third batch."""
    config = small_config(**LAYOUTS[request.param]).resolved_split()
    run_dir = str(tmp_path_factory.mktemp(request.param))
    with ActorMesh.take(config) as workers:
        *steps, (images, labels, lighting) = batches(config, 3)
        for step_images, step_labels, step_lighting in steps:
            workers.train_step(step_images, step_labels, 0.01, step_lighting)
        directory = checkpoint.checkpoint_dir(run_dir, len(steps))
        os.makedirs(directory)
        shards = workers.save(directory)
        checkpoint.write_manifest(directory, step=len(steps), epoch=0, config=config.to_dict(),
                                  mesh=dataclasses.asdict(config.mesh), shard_paths=shards, loader={})
        probes = workers.probe(images, labels, lighting)
    last = [p for p in probes if p.stage == config.stages - 1]  # rank order: tower 0, then tower 1
    logits = torch.cat([p.logits for p in last], dim=1)
    return TrainedRun(config, run_dir, directory, normalize_batch(images, lighting=lighting), logits)


def test_export_gives_the_distributed_runs_logits(trained_run, tmp_path, capsys):
    out = tmp_path / "alexnet.pt"
    status, printed, _ = run_cli(capsys, trained_run.run_dir, out)
    assert status == 0, printed
    assert str(out) in printed and "step 2" in printed
    cfg = trained_run.config.model_config
    state = torch.load(out, weights_only=True)
    assert type(state) is dict and all(isinstance(t, torch.Tensor) for t in state.values())
    grouped = GroupedAlexNet(cfg).eval()
    grouped.load_state_dict(state)  # (a) the grouped network
    reference = TwoTowerAlexNet(cfg).eval()
    reference.load_state_dict(from_grouped(state, cfg))  # (b) the single-process reference
    with torch.no_grad():
        assert_rel_close(grouped(trained_run.input), trained_run.logits, "grouped network's logits")
        assert_rel_close(reference(trained_run.input), trained_run.logits, "reference's logits")
    with open(tmp_path / "alexnet.json") as f:
        description = json.load(f)
    assert description["step"] == 2 and description["checkpoint"] == os.path.abspath(trained_run.checkpoint)
    assert description["layout"] == "grouped"
    assert description["model_config"] == dataclasses.asdict(cfg)
    assert description["tensors"] == {name: list(t.shape) for name, t in state.items()}
    assert description["parameters"] == sum(t.numel() for t in state.values())


def test_reference_layout_export_and_load_export(trained_run, tmp_path, capsys):
    out = tmp_path / "alexnet-reference.pt"
    status, _, _ = run_cli(capsys, trained_run.checkpoint, out, "--format", "reference")
    assert status == 0
    state = torch.load(out, weights_only=True)
    assert list(state) == list(TwoTowerAlexNet(trained_run.config.model_config).state_dict())
    for network in ("grouped", "reference"):
        net = load_export(str(out), network)
        with torch.no_grad():
            assert_rel_close(net(trained_run.input), trained_run.logits, f"load_export {network}")
