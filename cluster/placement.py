"""Where the mesh's actors run: one Ray placement group per replica, one bundle per stage.

A stage's bundle holds both of its tower actors, so the two towers of a stage — the pair that
exchanges activations at every cross-connection, the heaviest traffic of the mesh — always share a
node. The plan (`plan_placement`, a pure function of the nodes' free resources) packs the stages
of a replica onto as few nodes as fit and spreads the replicas over nodes (each replica starts on
the node hosting the fewest replicas so far, the one with the most free capacity first). Every
bundle is pinned to its planned node with a `ray.io/node-id` label selector, so Ray holds exactly
the plan. `--stage-resources 0=ssd` restricts a stage to nodes that offer the custom resource.

When the cluster cannot hold the plan the error says, per node, what is wanted and what is free.
"""

import dataclasses
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.config import TrainConfig
from cluster.mesh import Coord, Mesh

NODE_ID_LABEL = "ray.io/node-id"
PIN_AMOUNT = 0.01  # of a --stage-resources resource, per stage


class PlacementError(RuntimeError):
    """The cluster cannot hold (or did not start) the mesh's actors."""


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    free: dict  # resource name → amount available (now, or in all)


def cluster_nodes(capacity: bool = False) -> list[Node]:
    """The alive nodes of the connected Ray cluster with their free resources (`capacity`: their
    whole resources, as if nothing ran)."""
    from ray._private import state  # Ray's per-node view; the public API only gives the totals

    free = {} if capacity else state.available_resources_per_node()
    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"] if capacity else free.get(n["NodeID"], {})))
            for n in ray.nodes() if n["Alive"]]


def actor_resources(config: TrainConfig, nodes: list[Node]) -> dict:
    """Resources of one actor: a GPU each when the cluster has one per rank, else CPU threads."""
    gpus = sum(n.free.get("GPU", 0) for n in nodes)
    if gpus >= config.mesh.world_size:
        return {"CPU": 1, "GPU": 1}
    return {"CPU": config.threads_per_worker}


def stage_bundle(mesh: Mesh, per_actor: dict, resource: str | None) -> dict:
    """One stage of one replica: every tower's actor, plus the stage's pinning resource."""
    bundle = {name: amount * mesh.towers for name, amount in per_actor.items()}
    if resource:
        bundle[resource] = PIN_AMOUNT
    return bundle


def _fits(want: dict, free: dict) -> bool:
    return all(free.get(name, 0) >= amount - 1e-9 for name, amount in want.items())


def plan_placement(mesh: Mesh, per_actor: dict, nodes: list[Node], pinned: dict[int, str] | None = None,
                   view: str = "free") -> list[list[Node]]:
    """The node of every (replica, stage): `plan[replica][stage]`. Raises PlacementError naming
    the first bundle that fits nowhere, what it wants and what each node has (`view`: what the
    nodes' resources are, "free" or "in all")."""
    pinned = pinned or {}
    free = {n.node_id: dict(n.free) for n in nodes}
    hosted = {n.node_id: 0 for n in nodes}  # replicas with a stage on the node
    main = "GPU" if "GPU" in per_actor else "CPU"
    plan = []
    for replica in range(mesh.replicas):
        order = sorted(nodes, key=lambda n: (hosted[n.node_id], -free[n.node_id].get(main, 0), n.node_id))
        stages: list[Node] = []
        for stage in range(mesh.stages):
            want = stage_bundle(mesh, per_actor, pinned.get(stage))
            candidates = stages[-1:] + order  # pack: stay on the previous stage's node while it fits
            node = next((n for n in candidates if _fits(want, free[n.node_id])), None)
            if node is None:
                have = "; ".join(f"{n.address} {n.node_id[:8]}: {_format(free[n.node_id])}" for n in nodes)
                raise PlacementError(
                    f"replica {replica} stage {stage} needs {_format(want)} on one node (its {mesh.towers} tower "
                    f"actor(s) together) and no node has it {view} ({have or 'no nodes'}): add nodes, lower "
                    f"--threads-per-worker or --replicas, or check --stage-resources")
            for name, amount in want.items():
                free[node.node_id][name] -= amount
            stages.append(node)
        for node_id in {n.node_id for n in stages}:
            hosted[node_id] += 1
        plan.append(stages)
    return plan


def _format(resources: dict) -> str:
    shown = {k: v for k, v in resources.items()
             if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")
             and v > 0}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def place(config: TrainConfig, wait_for_nodes: bool = False, poll_s: float = 0.5,
          attempt_s: float = 10.0) -> tuple[dict, list]:
    """Plan the mesh on the cluster's free resources and reserve it: (per-actor resources, one
    placement group per replica, ready). Everything within --placement-timeout-s: resources a
    previous mesh held take a moment to come back, and a plan whose node died before Ray noticed
    is dropped after `attempt_s` and made again. A cluster whose nodes could never hold the mesh,
    even idle, is reported at once, unless `wait_for_nodes` (a restart: a node lost in the
    failure may come back, or an autoscaler add one)."""
    timeout = config.placement_timeout_s
    deadline = time.monotonic() + timeout
    while True:
        capacity = cluster_nodes(capacity=True)
        per_actor = actor_resources(config, capacity)
        try:  # could the cluster hold the mesh at all?
            plan_placement(config.mesh, per_actor, capacity, config.pinned_stages, view="in all")
        except PlacementError:
            if not wait_for_nodes:
                raise
        try:
            plan = plan_placement(config.mesh, per_actor, cluster_nodes(), config.pinned_stages)
        except PlacementError as err:
            if time.monotonic() >= deadline:
                raise PlacementError(f"{err} (waited {timeout:g} s)") from None
            time.sleep(poll_s)
            continue
        left = deadline - time.monotonic()
        groups = _reserve(config, per_actor, plan, min(left, attempt_s) if wait_for_nodes else left)
        if groups:
            return per_actor, groups
        if time.monotonic() >= deadline:
            raise PlacementError(f"the replicas' placement groups were not placed within {timeout:g} s (the cluster "
                                 f"has {_format(ray.available_resources())} free): free those resources, add nodes "
                                 f"or raise --placement-timeout-s")


def _reserve(config: TrainConfig, per_actor: dict, plan: list[list[Node]], timeout: float) -> list | None:
    """One placement group per replica (a bundle per stage, pinned to its planned node); None if
    they are not all ready within `timeout` seconds (then they are removed)."""
    groups = []
    for nodes in plan:
        bundles = [stage_bundle(config.mesh, per_actor, config.pinned_stages.get(s)) for s in range(config.stages)]
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


def format_placement(mesh: Mesh, where: list[dict]) -> str:
    """The placement table: one row per actor (its coordinates, node, GPUs, process)."""
    rows = [("rank", "replica", "stage", "tower", "node", "address", "GPU", "pid")]
    for rank, place in enumerate(where):
        coord: Coord = mesh.coord(rank)
        rows.append((str(rank), str(coord.replica), str(coord.stage), str(coord.tower), place["node_id"][:12],
                     place["address"], ",".join(map(str, place["gpus"])) or "-", str(place["pid"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
