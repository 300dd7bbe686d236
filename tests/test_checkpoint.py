"""A rank's checkpoint shard round-trips its weights and momentum, and loads with weights_only=True;
an asynchronous save writes the state of when it was asked, not of later steps."""

import os
import pickle

import pytest
import torch

from cluster.ckpt import checkpoint
from cluster.ckpt.reach import CHECK_FILE as STORAGE_CHECK

from runs import STEP, one_process_worker


def test_shard_round_trips_weights_and_momentum(tmp_path):
    trained = one_process_worker()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 63, 63), dtype=torch.uint8, generator=g)
    trained.train_step(STEP, images, torch.tensor([0, 1, 2, 3]))
    entry = trained.save(str(tmp_path))
    path = str(tmp_path / checkpoint.shard_file(0))
    assert entry == {"file": "rank00000.pt", "sha256": checkpoint.sha256_file(path), "bytes": os.path.getsize(path)}

    restored = one_process_worker()  # fresh init: differs until loaded
    restored.load(str(tmp_path))
    for (name, a), b in zip(trained.named_parameters().items(), restored.named_parameters().values()):
        assert torch.equal(a, b), name
    velocities = [restored.optimizer.state[p]["velocity"] for p in restored.model.parameters()]
    assert len(velocities) == len(list(trained.model.parameters())) and any(v.abs().sum() > 0 for v in velocities)
    # the next step is then identical too
    for worker in (trained, restored):
        worker.train_step(STEP, images, torch.tensor([3, 2, 1, 0]))
    for (name, a), b in zip(trained.named_parameters().items(), restored.named_parameters().values()):
        assert torch.equal(a, b), name


def test_a_shard_carrying_code_is_refused(tmp_path):
    class Payload:  # any pickled object beyond tensors and containers
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / checkpoint.shard_file(0), "wb") as f:
        torch.save({checkpoint.SHARD_MODEL: Payload()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        one_process_worker().load(str(tmp_path))


def test_an_asynchronous_save_holds_the_state_of_when_it_was_asked(tmp_path):
    worker, twin = one_process_worker(), one_process_worker()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 63, 63), dtype=torch.uint8, generator=g)
    for w in (worker, twin):
        w.train_step(STEP, images, torch.tensor([0, 1, 2, 3]))
    for name in ("async", "sync"):
        (tmp_path / name).mkdir()
    assert worker.save(str(tmp_path / "async"), asynchronous=True) is None  # returns at once
    worker.train_step(STEP, images, torch.tensor([3, 2, 1, 0]))  # changes weights and momentum meanwhile
    entry = worker.finish_save()
    assert entry["file"] == "rank00000.pt" and worker.finish_save() is None
    twin.save(str(tmp_path / "sync"))
    a = torch.load(tmp_path / "async" / "rank00000.pt", weights_only=True)
    b = torch.load(tmp_path / "sync" / "rank00000.pt", weights_only=True)
    for name, tensor in b[checkpoint.SHARD_MODEL].items():
        assert torch.equal(a[checkpoint.SHARD_MODEL][name], tensor), name
    for index, slot in b[checkpoint.SHARD_OPTIMIZER]["state"].items():
        assert torch.equal(a[checkpoint.SHARD_OPTIMIZER]["state"][index]["velocity"], slot["velocity"])


def test_an_actor_reports_whether_it_sees_the_run_dir(tmp_path):
    worker = one_process_worker()
    (tmp_path / STORAGE_CHECK).write_text("token-1")
    seen = worker.check_storage(str(tmp_path), "token-1")
    assert seen.ok and (tmp_path / f"{STORAGE_CHECK}.rank0").read_text() == "token-1"
    other = worker.check_storage(str(tmp_path), "token-2")  # another driver's directory
    assert not other.ok and "found another run's .storage-check" in other.detail
    missing = worker.check_storage(str(tmp_path / "not-mounted-here"), "token-1")
    assert not missing.ok and missing.detail.startswith("FileNotFoundError")
