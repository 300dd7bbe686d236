"""The deployment files, checked without a cluster: `ray_job.yaml` (the runtime env of `ray job
submit`), `deploy/cluster.yaml` (Ray cluster launcher, AWS), `deploy/rayjob.yaml` (KubeRay) and
`deploy/Dockerfile`, and the README's commands for them.

The driver's command lines go through the driver's own parser and configuration checks, and the
mesh through its own placement plan on the nodes the files describe. No Ray is started: only the
shard files' existence is not checked (they live on the cluster's shared volume)."""

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster import driver
from cluster.config import TrainConfig
from cluster.plan.placement import Node, actor_resources, plan_placement

REPO = Path(__file__).resolve().parents[1]
README_SECTION = "## Deploying on a GPU cluster"
DRIVER = ["python", "cluster/driver.py"]
KEPT_OUT = {".venv", ".git", "runs"}  # never uploaded to, nor synced onto, a cluster


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def ray_job() -> dict:
    return load("ray_job.yaml")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load("deploy/cluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load("deploy/rayjob.yaml")


@pytest.fixture(scope="module")
def dockerfile() -> list[list[str]]:
    """deploy/Dockerfile's instructions as words, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "deploy" / "Dockerfile").read_text())
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def readme_commands() -> list[list[str]]:
    """Every command in the README's deployment section's code blocks, as shell words."""
    text = (REPO / "README.md").read_text()
    assert README_SECTION in text, f"README.md has no section {README_SECTION!r}"
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", section, flags=re.DOTALL):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    assert commands, "the README's deployment section has no commands"
    return commands


def command(commands: list[list[str]], *start: str) -> list[str]:
    """The one command whose first words are `start`."""
    found = [words for words in commands if words[:len(start)] == list(start)]
    assert len(found) == 1, f"README: expected one command starting {' '.join(start)!r}, found {len(found)}"
    return found[0]


def driver_config(argv: list[str], monkeypatch) -> TrainConfig:
    """`argv` (what follows `python cluster/driver.py`) through the driver's parser and
    resolve_config, as a run would, except that the shard patterns are not expanded: the shards
    are on the cluster. Fails with the driver's own message."""
    patterns = []
    monkeypatch.setattr(driver, "expand_shards", lambda pattern: patterns.append(pattern) or [pattern])
    try:
        args = driver.parse_args(argv)
    except SystemExit:  # argparse printed why
        pytest.fail(f"the driver's parser refuses {shlex.join(argv)}")
    try:
        config = driver.resolve_config(args)
    except ValueError as err:  # ConfigError
        pytest.fail(f"the driver refuses {shlex.join(argv)}: {err}")
    assert patterns == [config.train_data, config.val_data]
    for pattern in patterns:  # a job runs in a copy of its working dir: relative paths would point into it
        assert all(os.path.isabs(part.strip()) for part in pattern.split(",")), \
            f"shard pattern {pattern!r} must be absolute"
    return config


def driver_argv(words: list[str]) -> list[str]:
    """The driver's arguments of a command line that runs `python cluster/driver.py ...`."""
    assert words[:2] == DRIVER, f"{shlex.join(words)!r} must start with {shlex.join(DRIVER)!r}"
    return words[2:]


def pinned(image: str) -> bool:
    """`repo/name:tag` with a tag other than `latest` (or a digest)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def ray_version(image: str) -> str:
    """The Ray version in a rayproject/ray image tag: `2.60.0` of `rayproject/ray:2.60.0-py311-gpu`."""
    match = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(-.*)?", image)
    assert match, f"{image!r} is not a pinned rayproject/ray image"
    return match.group(1)


def under(path: str, roots) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def cores(quantity) -> float:
    """A Kubernetes CPU quantity in cores: "88", 88, "500m"."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- ray_job.yaml


def test_ray_job_yaml_keeps_local_state_out_of_the_upload(ray_job):
    excludes = {pattern.strip("/") for pattern in ray_job["excludes"]}
    assert KEPT_OUT <= excludes, f"ray_job.yaml must exclude {sorted(KEPT_OUT - excludes)}"


# --- deploy/rayjob.yaml (KubeRay)


def rayjob_pods(rayjob: dict) -> list[tuple[str, dict, dict, int]]:
    """(group, rayStartParams, pod spec, pod count) of the head and every worker group."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    pods = [("head", head.get("rayStartParams", {}), head["template"]["spec"], 1)]
    for group in cluster["workerGroupSpecs"]:
        pods.append((group["groupName"], group.get("rayStartParams", {}), group["template"]["spec"],
                     group["replicas"]))
    return pods


def rayjob_nodes(rayjob: dict) -> list[Node]:
    """The Ray nodes the RayJob's pods make, with what Ray counts on each: num-cpus/num-gpus of
    rayStartParams, else (as KubeRay does) the ray container's CPU and GPU limits."""
    nodes = []
    for group, params, spec, count in rayjob_pods(rayjob):
        limits = spec["containers"][0]["resources"]["limits"]
        cpus = float(params.get("num-cpus", cores(limits["cpu"])))
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        nodes += [Node(f"{group}-{i}", f"{group}-{i}", {"CPU": cpus, "GPU": gpus}) for i in range(count)]
    return nodes


def test_rayjob_runs_the_driver_with_the_imagenet_recipe(rayjob, monkeypatch):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "the GPUs must be given back when the job ends"
    config = driver_config(driver_argv(shlex.split(spec["entrypoint"])), monkeypatch)
    assert config.recipe == "alexnet_2012"
    assert not config.address, "the job joins the cluster it runs in"


def test_rayjob_mesh_fills_the_worker_gpus_exactly(rayjob, monkeypatch):
    """One actor per GPU: replicas × stages × towers = the worker pods' GPUs (4 pods × 8 = 32 =
    16 × 1 × 2), every group's num-gpus is its pods' nvidia.com/gpu, and the driver's placement
    puts the whole mesh on GPUs (not on CPUs, which it does when GPUs are short)."""
    config = driver_config(driver_argv(shlex.split(rayjob["spec"]["entrypoint"])), monkeypatch)
    for group, params, spec, _ in rayjob_pods(rayjob):
        resources = spec["containers"][0]["resources"]
        gpu = resources["limits"].get("nvidia.com/gpu", 0)
        assert int(params.get("num-gpus", gpu)) == int(gpu), f"{group}: num-gpus differs from its GPU limit"
        assert resources.get("requests", {}).get("nvidia.com/gpu", gpu) == gpu, f"{group}: GPU request differs from limit"
    nodes = rayjob_nodes(rayjob)
    gpus = sum(n.free["GPU"] for n in nodes)
    assert config.mesh.world_size == gpus, f"{config.mesh.describe()} on {gpus:g} GPUs"
    assert actor_resources(config.mesh, config.threads_per_worker, nodes) == {"CPU": 1, "GPU": 1}
    plan = plan_placement(config.mesh, {"CPU": 1, "GPU": 1}, nodes)  # raises PlacementError if it cannot
    assert all(node.free["GPU"] > 0 for stages in plan for node in stages), "no actor on the head"


def test_rayjob_pods_request_resources_and_run_a_pinned_image(rayjob):
    images = set()
    for group, _, spec, count in rayjob_pods(rayjob):
        assert count >= 1, group
        for container in spec["containers"]:
            image = container.get("image", "")
            assert image and pinned(image), f"{group}/{container['name']}: image {image!r} must be pinned to a tag"
            images.add(image)
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for name in ("cpu", "memory"):
                    assert resources.get(kind, {}).get(name), f"{group}: no {name} in resources.{kind}"
    assert len(images) == 1, f"head and workers must run one image (one Ray, one Python), got {images}"
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert version == ray_version(dockerfile_base()), "rayVersion must be the image's Ray"


def test_rayjob_run_dir_and_shards_are_on_volumes_the_pods_mount(rayjob, monkeypatch):
    """Checkpoints: actors on every worker write shards, the driver on the head the manifest, so
    the run dir is on a volume every pod mounts (the same claim), or a URI. The shards are read by
    the driver, on the head."""
    config = driver_config(driver_argv(shlex.split(rayjob["spec"]["entrypoint"])), monkeypatch)
    mounts_of = {}
    for group, _, spec, _ in rayjob_pods(rayjob):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{group}: volumeMount {mount['name']!r} has no volume"
                mounts[mount["mountPath"]] = volumes[mount["name"]]
        mounts_of[group] = mounts
    if "://" not in config.run_dir:
        claims = set()
        for group, mounts in mounts_of.items():
            roots = [path for path, volume in mounts.items() if "persistentVolumeClaim" in volume]
            assert under(config.run_dir, roots), f"{group}: --run-dir {config.run_dir} is on no shared volume"
            root = max((r for r in roots if under(config.run_dir, [r])), key=len)
            claims.add(mounts[root]["persistentVolumeClaim"]["claimName"])
        assert len(claims) == 1, f"--run-dir must be on one shared claim, got {claims}"
    for pattern in (config.train_data, config.val_data):
        for part in pattern.split(","):
            assert under(part.strip(), mounts_of["head"]), f"shards {part} are on no volume of the head"


def test_rayjob_runtime_env_is_ray_job_yaml_with_the_code_from_the_image(rayjob, ray_job, dockerfile):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(ray_job["excludes"]) <= set(runtime_env.get("excludes", [])), "the excludes of ray_job.yaml"
    assert ray_job["env_vars"].items() <= runtime_env.get("env_vars", {}).items(), "the env_vars of ray_job.yaml"
    workdirs = [words[1] for words in dockerfile if words[0] == "WORKDIR"]
    assert runtime_env["working_dir"] == workdirs[-1], "working_dir must be where deploy/Dockerfile puts the code"


# --- deploy/cluster.yaml (Ray cluster launcher)


def test_cluster_yaml_is_a_valid_launcher_config(launcher):
    """What `ray up` does before it calls AWS: defaults filled in, then Ray's schema (Ray's own
    functions for it, private ones: the launcher has no public validation API)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert not head.get("resources", {}).get("GPU"), "the head is a CPU node"
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "GPU worker nodes"
    for name, node_type in types.items():
        assert node_type["node_config"].get("InstanceType"), f"{name}: no InstanceType"
        assert node_type.get("resources", {}).get("CPU") is not None, f"{name}: resources must state its CPUs"
    for name, node_type in workers.items():
        # the driver refuses at once a mesh the cluster could not hold even idle: the workers
        # must all be up before the job, not left to the autoscaler
        assert node_type["min_workers"] == node_type["max_workers"], f"{name}: min_workers must equal max_workers"
    assert sum(t["max_workers"] for t in workers.values()) <= launcher["max_workers"]


def test_cluster_yaml_runs_a_pinned_ray_image_with_the_dashboard_on_loopback(launcher):
    image = launcher["docker"]["image"]
    assert pinned(image), f"docker.image {image!r} must be pinned to a tag"
    for key in ("head_image", "worker_image"):
        assert key not in launcher["docker"] or pinned(launcher["docker"][key]), key
    assert ray_version(image) == ray_version(dockerfile_base()), "the launcher and the RayJob image: one Ray"
    head = " ".join(launcher["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head, \
        "the dashboard (the job API) must listen on the head's loopback only: ray dashboard tunnels to it"
    assert "0.0.0.0" not in head


def test_cluster_yaml_and_dockerfile_install_cuda_torch_then_the_project(launcher, dockerfile):
    """Both install the Makefile's PyTorch from a CUDA index, then the project from its code
    directory: the launcher's synced repo, the image's WORKDIR (where the RayJob's working_dir is)."""
    torch_version = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    code_dir = next(remote for remote, local in launcher["file_mounts"].items() if local in (".", "./"))
    workdir = [words[1] for words in dockerfile if words[0] == "WORKDIR"][-1]
    for source, commands, project in (
            ("deploy/cluster.yaml", [shlex.split(c, comments=True) for c in launcher["setup_commands"]], code_dir),
            ("deploy/Dockerfile", [words[1:] for words in dockerfile if words[0] == "RUN"], workdir)):
        pips = [words for words in commands if words[:2] == ["pip", "install"]]
        torch = [words for words in pips if any(w.startswith("torch==") for w in words)]
        assert torch and f"torch=={torch_version}" in torch[0], f"{source}: pip install torch=={torch_version}"
        assert "--index-url" in torch[0], f"{source}: torch from PyPI is not the CUDA build"
        index = torch[0][torch[0].index("--index-url") + 1]
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), f"{source}: {index} is no CUDA index"
        editable = [words[words.index("-e") + 1] for words in pips if "-e" in words]
        assert editable, f"{source}: no `pip install -e` of the project"
        assert pips.index(torch[0]) < next(i for i, w in enumerate(pips) if "-e" in w), f"{source}: torch first"
        assert [os.path.normpath(os.path.join(workdir if source.endswith("Dockerfile") else "/", e))
                for e in editable] == [project], f"{source}: installs {editable}, the code is in {project}"


def test_cluster_yaml_keeps_local_state_out_of_the_sync(launcher):
    excludes = {pattern.strip("/") for pattern in launcher["rsync_exclude"]}
    assert KEPT_OUT <= excludes, f"rsync_exclude must hold {sorted(KEPT_OUT - excludes)}"


def launcher_nodes(launcher: dict) -> list[Node]:
    nodes = []
    for name, node_type in launcher["available_node_types"].items():
        count = 1 if name == launcher["head_node_type"] else node_type["min_workers"]
        resources = {"CPU": 0.0, "GPU": 0.0, **node_type.get("resources", {})}
        nodes += [Node(f"{name}-{i}", f"{name}-{i}", resources) for i in range(count)]
    return nodes


def test_readme_job_fills_the_launcher_cluster_exactly(readme_commands, launcher, monkeypatch):
    """The README's `ray job submit` against deploy/cluster.yaml: its driver flags pass the driver's
    checks, its mesh is the worker nodes' GPUs (4 × 8 = 32 = 16 × 1 × 2) and places on them,
    and its run dir and shards are on the volume every container mounts."""
    submit = command(readme_commands, "ray", "job", "submit", "--address", "http://127.0.0.1:8265")
    options = submit[:submit.index("--")]
    assert options[options.index("--runtime-env") + 1] == "ray_job.yaml"
    assert options[options.index("--working-dir") + 1] == "."
    config = driver_config(driver_argv(submit[submit.index("--") + 1:]), monkeypatch)
    assert config.recipe == "alexnet_2012"
    nodes = launcher_nodes(launcher)
    gpus = sum(n.free["GPU"] for n in nodes)
    assert config.mesh.world_size == gpus, f"{config.mesh.describe()} on {gpus:g} GPUs"
    assert actor_resources(config.mesh, config.threads_per_worker, nodes) == {"CPU": 1, "GPU": 1}
    plan_placement(config.mesh, {"CPU": 1, "GPU": 1}, nodes)
    volumes = [option.split()[-1].split(":")[1] for option in launcher["docker"]["run_options"]
               if option.startswith(("--volume", "-v "))]
    assert "://" in config.run_dir or under(config.run_dir, volumes), f"--run-dir {config.run_dir} is not shared"
    for pattern in (config.train_data, config.val_data):
        assert all(under(part.strip(), volumes) for part in pattern.split(",")), f"{pattern} is not mounted"


# --- the README and the files it names


def test_readme_gives_the_exact_commands(readme_commands, rayjob, dockerfile):
    command(readme_commands, "ray", "up", "deploy/cluster.yaml")
    command(readme_commands, "ray", "dashboard", "deploy/cluster.yaml")
    command(readme_commands, "ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
            "--runtime-env", "ray_job.yaml", "--", *DRIVER, "--recipe", "alexnet_2012")
    command(readme_commands, "ray", "down", "deploy/cluster.yaml")
    image = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    command(readme_commands, "docker", "build", "-f", "deploy/Dockerfile", "-t", image, ".")
    command(readme_commands, "docker", "push", image)
    command(readme_commands, "kubectl", "apply", "-f", "deploy/rayjob.yaml")
    # KubeRay's submitter is a Kubernetes Job named after the RayJob
    command(readme_commands, "kubectl", "logs", "-f", f"job/{rayjob['metadata']['name']}")


def dockerfile_base() -> str:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    return re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)


# Words that name a file of this repository: `cluster/driver.py`, `deploy/cluster.yaml`, `ray_job.yaml`.
REPO_FILE = re.compile(r"[\w.-]+(?:/[\w.-]+)*\.(?:py|ya?ml|toml|cfg|txt|md|c|json)|deploy/[\w./-]+")


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def repo_references(text: str) -> set[str]:
    """The repository-relative file names in `text`: not absolute, not under ~, not a URL."""
    found = set()
    for word in re.split(r"[\s='\"]+", text):
        word = word.strip(",;()`")
        if word.startswith(("/", "~", "$")) or "://" in word or "@" in word:
            continue
        match = REPO_FILE.fullmatch(word)
        if match:
            found.add(word)
    return found


def test_every_repository_file_they_name_exists(launcher, rayjob, ray_job, dockerfile, readme_commands):
    references = {"ray_job.yaml", "deploy/cluster.yaml", "deploy/rayjob.yaml", "deploy/Dockerfile"}
    for document in (launcher, rayjob, ray_job, yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])):
        for text in strings(document):
            references |= repo_references(text)
    for words in readme_commands + dockerfile:
        references |= repo_references(" ".join(words))
    assert "cluster/driver.py" in references, references
    missing = sorted(name for name in references if not (REPO / name).exists())
    assert not missing, f"named but not in the repository: {missing}"
    # the repository directories synced or copied: file_mounts' local paths and the Dockerfile's COPY
    local_dirs = [local for local in launcher["file_mounts"].values() if not local.startswith(("/", "~"))]
    local_dirs += [words[-2] for words in dockerfile if words[0] == "COPY"]
    for local in local_dirs:
        assert (REPO / local).exists(), f"{local} is not in the repository"
        if (REPO / local).resolve() == REPO:
            for name in ("pyproject.toml", "setup.py", "cluster/driver.py", "data/_jpegroi.c"):
                assert (REPO / name).exists(), f"the project install needs {name}"
    assert (REPO / "deploy" / "Dockerfile.dockerignore").exists(), "the image would carry .venv and .git"
    ignored = {line.strip().strip("/") for line in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()}
    assert KEPT_OUT <= ignored, f"deploy/Dockerfile.dockerignore must hold {sorted(KEPT_OUT - ignored)}"
