"""The suite's own machinery: `make test` (`-n 2 --dist loadgroup`) runs each module's tests in one
pytest-xdist worker (tests/conftest.py gives every test its module's group), so a module's fixtures
(a shared run, a cluster of nodes, a mesh kept between tests) are made once, not once per worker.

pytest 9.2 broke that without an error: pytest-xdist 3.8 names a test's group by appending
"@group" to its node id, which pytest 9.2's structured node ids ignore, so every test was scheduled
on its own (pytest-dev/pytest-xdist#1386) and the suite made its module fixtures twice.
pyproject.toml keeps pytest below 9.2; this test fails if the grouping stops again."""

import re
import subprocess
import sys

from raytools import REPO

MODULES = ("tests/test_seeding.py", "tests/test_optim.py")  # quick, Ray-free, several tests each


def test_each_modules_tests_run_in_one_xdist_worker():
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
                          "-p", "no:cacheprovider", *MODULES],
                         cwd=REPO, capture_output=True, text=True, timeout=300).stdout
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"^\[(gw\d+)\] .*?PASSED (tests/\w+\.py)::", out, re.MULTILINE):
        workers.setdefault(module, set()).add(worker)
    assert set(workers) == set(MODULES), out[-3000:]
    spread = {module: sorted(names) for module, names in workers.items() if len(names) > 1}
    assert not spread, f"a module's tests ran on several workers: {spread} (pytest-dev/pytest-xdist#1386)"
