"""Imports flow one way, and each folder of cluster/ keeps to its role.

- stages/ and data/ import neither each other nor cluster/, nor anything distributed.
- cluster/ may import both. Inside it, by role (cluster/__init__.py):
  - plan/ is pure arithmetic: no Ray, no torch.distributed, nothing of cluster/ but plan/;
  - rank/ is what runs inside an actor: it imports Ray only inside functions, to ask for its node,
    and never launch/ or telemetry/;
  - ckpt/ and telemetry/ never import Ray nor launch/;
  - serve/ (after training: evaluate, predict, infer) may use Ray and the mesh, never the driver;
  - launch/ and the top level (driver, trainer, the commands) may import anything.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "stages": ("cluster", "data", "ray", "torch.distributed"),
    "data": ("cluster", "stages", "ray", "torch.distributed"),
    "cluster/plan": ("ray", "torch.distributed", "cluster.rank", "cluster.launch", "cluster.ckpt", "cluster.telemetry",
                     "cluster.config", "cluster.driver", "cluster.trainer"),
    "cluster/rank": ("cluster.launch", "cluster.telemetry", "cluster.driver", "cluster.trainer"),
    "cluster/ckpt": ("ray", "cluster.launch", "cluster.driver", "cluster.trainer"),
    "cluster/telemetry": ("ray", "cluster.launch", "cluster.driver", "cluster.trainer"),
    "cluster/launch": ("cluster.driver", "cluster.trainer"),
    "cluster/serve": ("cluster.driver",),
    "cluster": (),
}
LAZY_RAY = "cluster/rank"  # may import ray inside a function, not at module level


def imported_modules(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violates(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_cluster_module_is_in_a_known_folder():
    folders = {path.parent.relative_to(ROOT).as_posix() for path in (ROOT / "cluster").rglob("*.py")}
    assert folders <= set(FORBIDDEN), f"folders without import rules: {sorted(folders - set(FORBIDDEN))}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_flow(package):
    files = sorted((ROOT / package).glob("*.py")) if package.startswith("cluster") else sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules in {package}/"
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        names = imported_modules(path)
        for name in names:
            if any(violates(name, p) for p in FORBIDDEN[package]):
                bad.append(f"{rel} imports {name}")
        if package == LAZY_RAY and any(violates(n, "ray") for n in imported_modules(path, top_level_only=True)):
            bad.append(f"{rel} imports ray at module level (rank/ may ask Ray for its node inside a function only)")
    assert not bad, "\n".join(bad)


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from torch.distributed import all_reduce\nimport ray\n")
    assert any(violates(n, "torch.distributed") for n in imported_modules(bad))
    assert not any(violates(n, "torch.distributed") for n in imported_modules(bad, top_level_only=True))
    assert any(violates(n, "ray") for n in imported_modules(bad, top_level_only=True))
