"""Storage through pyarrow.fs: a local path and an S3 URI behave the same (cluster/ckpt/storage.py); a
run on S3 checkpoints, resumes exactly and exports; an unreachable run dir stops the run at start
with one line, not a hang.

S3 here is moto's server, a real S3 API on 127.0.0.1. It checks every request's signature
against the one access key the `s3` fixture creates, so the actors, which are Ray workers, can
write only if the AWS_* variables set before ray.init reached them.
"""

import dataclasses
import json
import logging
import os
import socket
import time
import uuid

import boto3
import pytest
import torch
from moto import settings as moto_settings
from moto.server import ThreadedMotoServer

from cluster import export
from cluster.ckpt import checkpoint, storage
from cluster.driver import main
from cluster.ckpt.reach import CHECK_FILE as STORAGE_CHECK
from runs import STEP, assert_same_tensors, losses, one_process_worker, shard_tensors, tiny_run_args

BUCKET = "alexnet-runs"
S3_ACCESS = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclasses.dataclass
class S3:
    host: str
    port: int

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.host}:{self.port}&scheme=http"


def aws_env(monkeypatch: pytest.MonkeyPatch, key_id: str, secret: str) -> None:
    """Credentials by the standard variables only: no profile, no instance metadata."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on 127.0.0.1 with bucket BUCKET; from setup on, only a user's key is let in,
    and that key is in the environment for the module's tests."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            aws_env(mp, "setup", "setup")
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            iam = boto3.client("iam", endpoint_url=endpoint)
            iam.create_user(UserName="trainer")
            key = iam.create_access_key(UserName="trainer")["AccessKey"]
            policy = iam.create_policy(PolicyName="s3", PolicyDocument=json.dumps(S3_ACCESS))["Policy"]
            iam.attach_user_policy(UserName="trainer", PolicyArn=policy["Arn"])
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            mp.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # every request signed from here on
            aws_env(mp, key["AccessKeyId"], key["SecretAccessKey"])
            yield S3(host, port)
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A directory that does not exist yet: a path, or a fresh prefix on moto's S3."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3").uri(f"unit-{uuid.uuid4().hex[:8]}")


# --- the module on its own

def test_a_uri_keeps_its_options_through_join():
    uri = "s3://bucket/runs/a?endpoint_override=127.0.0.1:9000&scheme=http"
    shard = storage.join(uri, "checkpoint-00000005", "rank00001.pt")
    assert shard == "s3://bucket/runs/a/checkpoint-00000005/rank00001.pt?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.basename(storage.join(uri, "checkpoint-00000005")) == "checkpoint-00000005"
    assert storage.open_storage(shard).path == "bucket/runs/a/checkpoint-00000005/rank00001.pt"
    assert storage.join("s3://bucket", "run") == "s3://bucket/run"
    assert storage.absolute(uri) == uri  # a URI is not a path to make absolute
    assert storage.absolute("runs/a") == os.path.join(os.getcwd(), "runs", "a")
    assert storage.join("runs/a", "checkpoint-00000005") == os.path.join("runs/a", "checkpoint-00000005")
    assert storage.basename("runs/a/checkpoint-00000005/") == "checkpoint-00000005"


@pytest.mark.parametrize("location, message", [
    ("nosuch://bucket/run", "Unrecognized filesystem type"),
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/run?endpoint_override=127.0.0.1:9", "carries a secret"),
    ("s3://bucket/run?endpoint_override=127.0.0.1:9&connect_timeout=soon", "connect_timeout must be seconds"),
    ("s3://bucket/run?endpoint_override=127.0.0.1:9&colour=blue", "Unexpected query parameter in S3 URI: 'colour'"),
])
def test_a_bad_location_is_refused_on_opening(location, message):
    with pytest.raises(ValueError, match=message):
        storage.open_storage(location)


def test_the_same_operations_on_a_path_and_on_s3(root):
    run = storage.open_storage(root)
    assert not run.exists() and run.listdir() == []
    run.child("checkpoint-00000001").makedirs()
    assert run.is_dir() and run.listdir() == ["checkpoint-00000001"]
    shard = run.child("checkpoint-00000001", "rank00000.pt")
    shard.write_bytes(b"\x00" * 10 + b"weights")
    # reopened from the string alone, as another process does
    again = storage.open_storage(storage.join(root, "checkpoint-00000001", "rank00000.pt"))
    assert again.location == shard.location
    assert again.exists() and again.size() == 17 and again.read_bytes() == b"\x00" * 10 + b"weights"
    run.child("manifest.json").write_bytes(b"{}")
    assert run.listdir() == ["checkpoint-00000001", "manifest.json"]
    shard.write_bytes(b"v2")  # replaced whole
    assert again.read_bytes() == b"v2" and again.size() == 2
    with pytest.raises(FileNotFoundError):
        run.child("checkpoint-00000001").size()  # a directory has no size
    with pytest.raises(FileNotFoundError):
        run.child("absent.pt").read_bytes()
    run.child("checkpoint-00000001").delete_dir()
    assert not shard.exists() and run.listdir() == ["manifest.json"]
    run.child("manifest.json").delete()
    assert run.listdir() == []


def test_checkpoints_are_listed_verified_and_pruned_the_same(root):
    for step in (1, 2, 3):
        directory = checkpoint.checkpoint_dir(root, step)
        storage.open_storage(directory).makedirs()
        entry = checkpoint.write_shard(storage.join(directory, checkpoint.shard_file(0)),
                                       {"w": torch.full((3,), step)})
        if step < 3:  # step 3 stopped before its manifest
            checkpoint.write_manifest(directory, step=step, epoch=0, config={}, mesh={}, shard_paths=[entry], loader={})
    complete = checkpoint.complete_checkpoints(root)
    assert complete == [checkpoint.checkpoint_dir(root, s) for s in (1, 2)]
    assert checkpoint.find_resume(root, "auto") == complete[-1]
    assert checkpoint.verify(complete[-1])[checkpoint.KEY_SHARDS] == [_entry_of(complete[-1])]
    assert torch.equal(checkpoint.load_shard(complete[-1], "rank00000.pt")["w"], torch.full((3,), 2))
    # a shard replaced after its manifest is refused, and auto falls back to the one before
    storage.open_storage(storage.join(complete[-1], "rank00000.pt")).write_bytes(b"not the shard")
    with pytest.raises(checkpoint.CheckpointError, match="has 13 bytes, the manifest says"):
        checkpoint.verify(complete[-1])
    assert checkpoint.find_resume(root, "auto") == complete[0]
    assert checkpoint.prune(root, keep=1) == [complete[0]]
    assert storage.open_storage(root).listdir() == ["checkpoint-00000002", "checkpoint-00000003"]


def _entry_of(directory: str) -> dict:
    """A shard's manifest entry computed afresh from what is stored."""
    path = storage.join(directory, "rank00000.pt")
    return {"file": "rank00000.pt", "sha256": checkpoint.sha256_file(path), "bytes": storage.open_storage(path).size()}


def test_a_local_write_is_temp_file_fsync_rename(tmp_path, monkeypatch):
    target = storage.open_storage(str(tmp_path / "manifest.json"))
    target.write_bytes(b"old")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target.write_bytes(b"new")
    tmp, final = str(tmp_path / "manifest.json.tmp"), str(tmp_path / "manifest.json")
    assert calls == [("fsync", tmp), ("rename", tmp, final), ("fsync", str(tmp_path))]
    assert target.read_bytes() == b"new"


def test_a_local_write_that_dies_before_the_rename_leaves_no_file(tmp_path, monkeypatch):
    target = storage.open_storage(str(tmp_path / "manifest.json"))
    target.write_bytes(b"old")

    def crash(src, dst):
        raise OSError("the machine stopped between the temporary file and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="machine stopped"):
        target.write_bytes(b"new")
    assert target.read_bytes() == b"old"  # the old file, whole
    fresh = storage.open_storage(str(tmp_path / "checkpoint-00000001" / checkpoint.MANIFEST))
    os.mkdir(tmp_path / "checkpoint-00000001")
    with pytest.raises(OSError, match="machine stopped"):
        fresh.write_bytes(b"{}")
    assert not fresh.exists() and checkpoint.complete_checkpoints(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000001", "manifest.json"]


def test_s3_writes_the_final_key_in_one_upload_and_large_objects_whole(s3):
    run = storage.open_storage(s3.uri(f"large-{uuid.uuid4().hex[:8]}"))
    data = os.urandom(12 << 20)  # past pyarrow's multipart part size
    run.child("rank00000.pt").write_bytes(data)
    assert run.listdir() == ["rank00000.pt"]  # no temporary object, before or after
    assert run.child("rank00000.pt").read_bytes() == data


def test_the_s3_server_refuses_other_credentials(s3, monkeypatch):
    # what makes the end-to-end test below a check that the actors got the credentials
    aws_env(monkeypatch, "AKIAOTHER", "other-secret")
    other = storage.open_storage(s3.uri("refused") + "&region=us-east-1")  # options of its own: a new client
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        other.makedirs()


# --- an actor's side, in this process

def test_an_actor_saves_loads_and_checks_an_s3_run_dir(s3):
    run = s3.uri(f"actor-{uuid.uuid4().hex[:8]}")
    trained = one_process_worker()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 63, 63), dtype=torch.uint8, generator=g)
    trained.train_step(STEP, images, torch.tensor([0, 1, 2, 3]))
    assert trained.save(run, asynchronous=True) is None
    entry = trained.finish_save()
    assert entry == _entry_of(run)
    restored = one_process_worker()
    restored.load(run)
    for (name, a), b in zip(trained.named_parameters().items(), restored.named_parameters().values()):
        assert torch.equal(a, b), name
    storage.open_storage(storage.join(run, STORAGE_CHECK)).write_bytes(b"token-1")
    assert restored.check_storage(run, "token-1").ok
    assert storage.open_storage(storage.join(run, f"{STORAGE_CHECK}.rank0")).read_bytes() == b"token-1"


# --- the driver end to end

@pytest.mark.timeout(600)
def test_a_run_on_s3_resumes_exactly_and_exports(s3, restarted_ray, tiny_demo, tmp_path, capsys):
    # 60 training images in batches of 8: 7 steps per epoch. The runs stop at step 3 and 5, inside
    # the epoch, each with a checkpoint (of 80 MB per tower: fc7 is the paper's). Dropout on.
    common = ["--log-every", "1", "--dropout", "0.5"]
    run = s3.uri("run")
    assert main(tiny_run_args(tiny_demo, tmp_path / "straight", *common, "--max-steps", "5")) == 0
    straight = capsys.readouterr().out
    assert main(tiny_run_args(tiny_demo, run, *common, "--max-steps", "3")) == 0
    first_part = capsys.readouterr().out
    assert f"run dir {run}" in first_part and f"checkpoint: {checkpoint.checkpoint_dir(run, 3)}" in first_part
    assert main(tiny_run_args(tiny_demo, run, *common, "--max-steps", "5")) == 0
    resumed = capsys.readouterr().out
    assert f"resumed from {checkpoint.checkpoint_dir(run, 3)}" in resumed
    assert losses(straight) == {**losses(first_part), **losses(resumed)} and len(losses(straight)) == 5
    assert_same_tensors(shard_tensors(tmp_path / "straight" / "checkpoint-00000005"),
                        shard_tensors(checkpoint.checkpoint_dir(run, 5)))
    # no storage-check file left behind
    names = storage.open_storage(run).listdir()
    assert [name for name in names if name.startswith("checkpoint-")] == ["checkpoint-00000003", "checkpoint-00000005"]
    assert not [name for name in names if name.startswith(STORAGE_CHECK)], names
    # the same export from the S3 run dir as from the local one
    assert export.main([run, str(tmp_path / "from-s3.pt")]) == 0
    assert export.main([str(tmp_path / "straight"), str(tmp_path / "from-local.pt")]) == 0
    assert "step 5 of " + checkpoint.checkpoint_dir(run, 5) in capsys.readouterr().out
    ours = torch.load(tmp_path / "from-s3.pt", weights_only=True)
    theirs = torch.load(tmp_path / "from-local.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_uri_run_dir_is_kept_as_given(s3, tiny_demo, capsys, driver_never_starts_ray):
    run = s3.uri("shown")
    assert main(tiny_run_args(tiny_demo, run, "--show-config")) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == run  # not made a local path
    assert main(tiny_run_args(tiny_demo, "nosuch://bucket/run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run_dir nosuch://bucket/run: ArrowInvalid: Unrecognized filesystem type")
    assert len(err.splitlines()) == 1


@pytest.fixture(params=["closed port", "silent server"])
def unreachable_endpoint(request):
    """127.0.0.1:PORT where nothing listens, or where a socket listens and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if request.param == "silent server":
            sock.listen(16)
            yield sock.getsockname()[1]
            return
        port = sock.getsockname()[1]
    yield port


@pytest.mark.timeout(120)
def test_an_unreachable_run_dir_stops_the_run_at_start(unreachable_endpoint, tiny_demo, monkeypatch, capsys,
                                                       driver_never_starts_ray):
    aws_env(monkeypatch, "AKIAEXAMPLE", "secret")
    run = (f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{unreachable_endpoint}&scheme=http"
           f"&connect_timeout=1&request_timeout=1")
    started = time.monotonic()
    assert main(tiny_run_args(tiny_demo, run)) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: run_dir {run} is not reachable from the driver: OSError: "), err
    assert "NETWORK_CONNECTION" in err  # and before any actor (driver_never_starts_ray)
    # pyarrow retries 3 times with 1 s timeouts; without request_timeout a silent server holds
    # each request for over a minute
    assert elapsed < 60, elapsed
