"""Where the mesh's actors run, as a plan: one placement group per replica, one bundle per stage.

A stage's bundle holds both of its tower actors, so the two towers of a stage — the pair that
exchanges activations at every cross-connection, the heaviest traffic of the mesh — always share a
node. The plan (`plan_placement`, a pure function of the nodes' free resources) packs the stages
of a replica onto as few nodes as fit and spreads the replicas over nodes (each replica starts on
the node hosting the fewest replicas so far, the one with the most free capacity first). Every
bundle is pinned to its planned node with a `ray.io/node-id` label selector, so Ray holds exactly
the plan. `--stage-resources 0=ssd` restricts a stage to nodes that offer the custom resource.

When the cluster cannot hold the plan the error says, per node, what is wanted and what is free.
Pure: the nodes come in as values; cluster/launch/placement_groups.py asks Ray for them and
reserves the plan, and cluster/plan/scaling.py uses the same rule for its meshes.
"""

import dataclasses

from cluster.plan.mesh import Coord, Mesh

NODE_ID_LABEL = "ray.io/node-id"
PIN_AMOUNT = 0.01  # of a --stage-resources resource, per stage


class PlacementError(RuntimeError):
    """The cluster cannot hold (or did not start) the mesh's actors."""


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    free: dict  # resource name → amount available (now, or in all)


def actor_resources(mesh: Mesh, threads_per_worker: int, nodes: list[Node]) -> dict:
    """Resources of one actor: a GPU each when the cluster has one per rank, else CPU threads."""
    gpus = sum(n.free.get("GPU", 0) for n in nodes)
    if gpus >= mesh.world_size:
        return {"CPU": 1, "GPU": 1}
    return {"CPU": threads_per_worker}


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
                have = "; ".join(f"{n.address} {n.node_id[:8]}: {format_resources(free[n.node_id])}" for n in nodes)
                raise PlacementError(
                    f"replica {replica} stage {stage} needs {format_resources(want)} on one node (its {mesh.towers} tower "
                    f"actor(s) together) and no node has it {view} ({have or 'no nodes'}): add nodes, lower "
                    f"--threads-per-worker or --replicas, or check --stage-resources")
            for name, amount in want.items():
                free[node.node_id][name] -= amount
            stages.append(node)
        for node_id in {n.node_id for n in stages}:
            hosted[node_id] += 1
        plan.append(stages)
    return plan


def format_resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items()
             if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")
             and v > 0}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def format_placement(mesh: Mesh, where: list[dict]) -> str:
    """The placement table: one row per actor (its coordinates, node, GPUs, process)."""
    rows = [("rank", "replica", "stage", "tower", "node", "address", "GPU", "pid")]
    for rank, place in enumerate(where):
        coord: Coord = mesh.coord(rank)
        rows.append((str(rank), str(coord.replica), str(coord.stage), str(coord.tower), place["node_id"][:12],
                     place["address"], ",".join(map(str, place["gpus"])) or "-", str(place["pid"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
