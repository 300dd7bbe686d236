"""Imports flow one way: cluster/ → stages/, data/; stages/ and data/ import neither each other nor
cluster/, nor anything distributed; only the actor, placement and driver modules import ray."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "stages": ("cluster", "data", "ray", "torch.distributed"),
    "data": ("cluster", "stages", "ray", "torch.distributed"),
    "cluster": (),
}
RAY_MODULES = {"cluster/actor_mesh.py", "cluster/driver.py", "cluster/placement.py", "cluster/worker.py"}


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violates(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_flow(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules in {package}/"
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for name in imported_modules(path):
            if any(violates(name, p) for p in FORBIDDEN[package]):
                bad.append(f"{rel} imports {name}")
            if violates(name, "ray") and package == "cluster" and rel not in RAY_MODULES:
                bad.append(f"{rel} imports ray (only {', '.join(sorted(RAY_MODULES))} may)")
    assert not bad, "\n".join(bad)


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from torch.distributed import all_reduce\n")
    assert any(violates(n, "torch.distributed") for n in imported_modules(bad))
