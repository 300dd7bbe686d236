"""Shared fixtures: a local Ray per test module, bound to 127.0.0.1 and always shut down."""

import pytest
import ray

from cluster.launch import localnet


@pytest.fixture(scope="module")
def local_ray():
    restore_env = localnet.apply_loopback_env()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address=localnet.LOOPBACK)
    try:
        yield
    finally:
        ray.shutdown()
        restore_env()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small copy of the demo dataset: 10 classes, 6 training and 2 validation images each."""
    from data.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), train_per_class=6, val_per_class=2)
