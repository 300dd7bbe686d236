"""The mesh's rank arithmetic and the progress line's rate and ETA."""

import pytest

from cluster.plan.mesh import Coord, Mesh
from cluster.telemetry.progress import Progress, format_duration


def test_ranks_are_tower_fastest_and_round_trip():
    mesh = Mesh(replicas=1, stages=1, towers=2)
    assert mesh.world_size == 2
    assert [mesh.rank(Coord(0, 0, t)) for t in (0, 1)] == [0, 1]
    assert [mesh.coord(r) for r in (0, 1)] == [Coord(0, 0, 0), Coord(0, 0, 1)]
    assert mesh.tower_groups() == [[0, 1]]
    assert Mesh(towers=1).tower_groups() == [[0]]


@pytest.mark.parametrize("kwargs, message", [
    ({"towers": 3}, "towers must be one of 1, 2, got 3: the paper splits every layer across two towers"),
    ({"stages": 9}, "stages must be one of 1, 2, 3, 4, 5, 6, 7, 8, got 9: each stage holds at least one of the 8 layers"),
    ({"stages": 0}, "stages must be one of 1, .*, got 0"),
    ({"replicas": 0}, "replicas must be in 1..1024, got 0"),
])
def test_unsupported_mesh_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mesh(**kwargs)


def test_lanes_and_stage_links():
    # 3 stages × 2 towers: ranks (stage, tower) = 0:(0,0) 1:(0,1) 2:(1,0) 3:(1,1) 4:(2,0) 5:(2,1)
    mesh = Mesh(stages=3, towers=2)
    assert mesh.lane(0, 0) == [0, 2, 4] and mesh.lane(0, 1) == [1, 3, 5]
    assert mesh.tower_groups() == [[0, 1], [2, 3], [4, 5]]
    assert mesh.stage_links() == [(0, 2), (2, 4), (1, 3), (3, 5)]
    assert Mesh(stages=2, towers=1).stage_links() == [(0, 1)]
    assert Mesh(stages=1).stage_links() == []


def test_replica_groups_join_one_stage_and_tower_across_replicas():
    # 2 replicas × 2 stages × 2 towers: rank = (replica · 2 + stage) · 2 + tower
    mesh = Mesh(replicas=2, stages=2, towers=2)
    assert mesh.world_size == 8
    assert mesh.replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.lane(1, 0) == [4, 6] and mesh.tower_group(1, 1) == [6, 7]
    assert mesh.stage_links() == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert Mesh(replicas=3, towers=1).replica_groups() == [[0, 1, 2]]
    assert mesh.loss_ranks() == [2, 6]  # each replica's last stage, tower 0


def test_rank_outside_the_mesh_is_refused():
    with pytest.raises(ValueError, match="rank 2 is outside the mesh's 2 ranks"):
        Mesh().coord(2)
    with pytest.raises(ValueError, match="tower 2 is outside the mesh's 2"):
        Mesh().rank(Coord(0, 0, 2))


def test_progress_rate_and_eta_leave_out_the_warm_up_step():
    progress = Progress(total_steps=10)
    progress.update(32, 5.0)  # the first step pays for start-up: 5 s
    for _ in range(4):  # then 1 s per 32-image step
        progress.update(32, 1.0)
    assert progress.images_per_second == pytest.approx(32.0) == progress.mean_images_per_second
    assert progress.eta() == pytest.approx(5.0)  # 5 steps left at 1 s each
    assert "step 5/10 | epoch 1/2 | loss 1.5000 | lr 0.01 | 32.0 img/s | ETA 5s" == progress.line(0, 2, 1.5, 0.01)
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"


def test_progress_rate_is_over_the_recent_steps():
    progress = Progress(total_steps=100, window=3)
    progress.update(32, 9.0)  # warm-up, left out
    for seconds in (4.0, 4.0, 1.0, 1.0, 1.0):  # the run speeds up: the last 3 steps take 1 s each
        progress.update(32, seconds)
    assert progress.images_per_second == pytest.approx(32.0)
    assert progress.eta() == pytest.approx(94.0)  # 94 steps left at the recent 1 s each
    assert progress.mean_images_per_second == pytest.approx(5 * 32 / 11.0)
