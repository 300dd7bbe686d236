"""Shared fixtures.

Ray: one local Ray on 127.0.0.1 serves every in-process run of the session — the actor meshes
of the parity tests and the driver's `main()`, which joins a Ray it finds running and leaves it
up. It starts on first use (`shared_ray`) and stops at the end of the session. A test whose
actors must see environment it sets first asks for `restarted_ray`, which starts it again. Tests that run the driver as
a subprocess, or `ray start`, start and stop their own Ray and need neither.

Markers: `ray` for tests that start Ray or its actors (`make test-fast` leaves them out). With
pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), each module's tests run in one worker, so
its module fixtures are made once; the monitoring tests share one group (tests/monitored.py).
"""

import pytest

from raytools import ensure_shared_ray, stop_shared_ray


@pytest.fixture
def shared_ray():
    """The session's local Ray (started on first use, bound to 127.0.0.1)."""
    ensure_shared_ray()
    yield


@pytest.fixture(scope="module")
def local_ray():
    """The session's local Ray, for a module's fixtures (the parity meshes)."""
    ensure_shared_ray()
    yield


@pytest.fixture
def restarted_ray():
    """The session's Ray started afresh, so that its actors inherit the environment as it is
    now (e.g. credentials a fixture set); it stays up for the tests after."""
    stop_shared_ray()
    ensure_shared_ray()
    yield


def pytest_sessionfinish(session, exitstatus):
    stop_shared_ray()


# The slowest modules (43 to 171 s each of `make test` on 2 cores, 2026-12-07), in an order that
# ended both workers within 5 s of each other. pytest-xdist hands each worker a module at a time
# in the order of the collection (`make test` turns off its reordering by test count, which put
# the fewest-test and slowest modules last), so these start first, then the other modules that
# start Ray, then the quick Ray-free ones, which fill the end: the two workers finish together.
# A stale list costs only that balance.
SLOWEST_FIRST = ("test_faults", "test_multinode", "test_bench", "test_precision", "test_job_submit", "test_resume",
                 "test_loaders", "test_pipeline", "test_infer", "test_replicas", "test_ablations", "test_driver")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    starts_ray = set()  # the groups with a test that starts Ray
    for item in items:
        if {"shared_ray", "local_ray", "restarted_ray"} & set(item.fixturenames):  # it starts Ray
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("xdist_group") is None:  # with -n, a module's tests share a worker
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        if item.get_closest_marker("ray") is not None:
            starts_ray.add(_group(item))

    def order(item):
        module = item.module.__name__
        if module in SLOWEST_FIRST:
            return 0, SLOWEST_FIRST.index(module)
        return (1 if _group(item) in starts_ray else 2), 0

    items.sort(key=order)  # stable: a group's tests keep their order and stay together


def _group(item) -> str:
    return item.get_closest_marker("xdist_group").args[0]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small copy of the demo dataset: 10 classes, 6 training and 2 validation images each."""
    from data.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), train_per_class=6, val_per_class=2)


@pytest.fixture
def driver_never_starts_ray(monkeypatch):
    """Fails the test if the driver gets as far as Ray: for bad input, which must stop before."""
    import cluster.driver

    def refuse(*args, **kwargs):
        raise AssertionError("the driver started Ray (bad input must stop before any actor)")

    monkeypatch.setattr(cluster.driver, "ray_session", refuse)
    monkeypatch.setattr(cluster.driver.ActorMesh, "take", refuse)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request, monkeypatch):
    """A test without the `ray` marker that starts Ray in this process fails (`make test-fast` must
    stay Ray-free)."""
    if request.node.get_closest_marker("ray") is None:
        import ray

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray")

        monkeypatch.setattr(ray, "init", refuse)
