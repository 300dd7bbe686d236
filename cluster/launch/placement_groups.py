"""Reserving the placement plan on a live Ray cluster: one placement group per replica, one bundle
per stage, each bundle pinned to its planned node (cluster/plan/placement.py makes the plan).
"""

import dataclasses
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.config import TrainConfig
from cluster.plan.placement import (NODE_ID_LABEL, Node, PlacementError, actor_resources, auto_loaders,
                                    format_resources, plan_placement, stage_bundle)


def cluster_nodes(capacity: bool = False) -> list[Node]:
    """The alive nodes of the connected Ray cluster with their free resources (`capacity`: their
    whole resources, as if nothing ran)."""
    from ray._private import state  # Ray's per-node view; the public API only gives the totals

    free = {} if capacity else state.available_resources_per_node()
    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"] if capacity else free.get(n["NodeID"], {})))
            for n in ray.nodes() if n["Alive"]]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A reserved mesh: what each tower actor and each loader takes, and the placement groups."""

    per_actor: dict  # resources of one tower actor
    loaders: int  # loader actors per replica (0: the mesh has none)
    loader_cpus: float  # CPUs of one loader actor
    groups: list  # one placement group per replica; bundle s holds stage s (and stage 0 the loaders)


def place(config: TrainConfig, with_loaders: bool, wait_for_nodes: bool = False, poll_s: float = 0.5,
          attempt_s: float = 10.0) -> Placement:
    """Plan the mesh on the cluster's free resources and reserve it, with `with_loaders` the
    loader actors too (--loaders-per-replica, 0: `auto_loaders` from the nodes' capacity).
    Everything within --placement-timeout-s: resources a previous mesh held take a moment to
    come back, and a plan whose node died before Ray noticed is dropped after `attempt_s` and
    made again. A cluster whose nodes could never hold the mesh, even idle, is reported at once,
    unless `wait_for_nodes` (a restart: a node lost in the failure may come back, or an
    autoscaler add one), which waits up to --restart-wait-s instead."""
    timeout, option = ((config.restart_wait_s, "--restart-wait-s") if wait_for_nodes
                       else (config.placement_timeout_s, "--placement-timeout-s"))
    deadline = time.monotonic() + timeout
    while True:
        capacity = cluster_nodes(capacity=True)
        per_actor = actor_resources(config.mesh, config.threads_per_worker, capacity)
        loaders = 0
        if with_loaders:
            loaders = config.loaders_per_replica or auto_loaders(config.mesh, per_actor, config.loader_threads, capacity)
        loader_cpus = loaders * config.loader_threads
        try:  # could the cluster hold the mesh at all?
            plan_placement(config.mesh, per_actor, capacity, config.pinned_stages, "in all", loader_cpus)
        except PlacementError:
            if not wait_for_nodes:
                raise
        try:
            plan = plan_placement(config.mesh, per_actor, cluster_nodes(), config.pinned_stages, "free", loader_cpus)
        except PlacementError as err:
            if time.monotonic() >= deadline:
                raise PlacementError(f"{err} (waited {timeout:g} s)") from None
            time.sleep(poll_s)
            continue
        left = deadline - time.monotonic()
        groups = _reserve(config, per_actor, loader_cpus, plan, min(left, attempt_s) if wait_for_nodes else left)
        if groups:
            return Placement(per_actor, loaders, config.loader_threads, groups)
        if time.monotonic() >= deadline:
            raise PlacementError(f"the replicas' placement groups were not placed within {timeout:g} s (the cluster "
                                 f"has {format_resources(ray.available_resources())} free): free those resources, "
                                 f"add nodes or raise {option}")


def _reserve(config: TrainConfig, per_actor: dict, loader_cpus: float, plan: list[list[Node]],
             timeout: float) -> list | None:
    """One placement group per replica (a bundle per stage, pinned to its planned node); None if
    they are not all ready within `timeout` seconds (then they are removed)."""
    groups = []
    for nodes in plan:
        bundles = [stage_bundle(config.mesh, per_actor, s, config.pinned_stages.get(s), loader_cpus)
                   for s in range(config.stages)]
        groups.append(placement_group(bundles, strategy="PACK",
                                      bundle_label_selector=[{NODE_ID_LABEL: n.node_id} for n in nodes]))
    _, pending = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=max(timeout, 0.0))
    if pending:
        release(groups)
        return None
    return groups


def release(groups: list) -> None:
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # already gone with its node or the session
            pass


