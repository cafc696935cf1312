"""Maze layouts: coordinate frames, SDF, collisions, grid paths (against hand/brute-force references)."""

import math

import numpy as np
import pytest
import torch

from maze.mazes import (
    MAZE_NAMES,
    bfs_distance,
    collides,
    d4rl_to_world,
    get_maze,
    make_maze,
    sdf_from_occupancy,
    segment_crosses_wall,
    shortest_path,
    to_norm,
    to_world,
    wall_distance,
)


def _gym_maze(name):
    """gymnasium-robotics' own Maze object (its cell_rowcol_to_xy is the reference frame)."""
    from gymnasium_robotics.envs.maze import maps
    from gymnasium_robotics.envs.maze.maze_v4 import Maze as GymMaze

    m = {"umaze": maps.U_MAZE, "medium": maps.MEDIUM_MAZE, "large": maps.LARGE_MAZE}[name]
    return GymMaze(m, 1.0, 0.4), m


@pytest.mark.parametrize("name", MAZE_NAMES)
@pytest.mark.parametrize("flip_y", [True, False])
def test_cell_centres_land_in_their_cell(name, flip_y):
    gm, mp = _gym_maze(name)
    m = get_maze(name, flip_y=flip_y)
    assert m.G == 12 and m.occ.shape == (12, 12)
    for i, row in enumerate(mp):
        for j, v in enumerate(row):
            xy = gm.cell_rowcol_to_xy(np.array([i, j]))
            u, vv = to_norm(xy, m)
            assert 0 < u < 1 and 0 < vv < 1
            assert m.occ[int(vv * m.G), int(u * m.G)] == (1.0 if v == 1 else 0.0), (i, j)
    # padding is wall
    assert m.occ[m.H :].size == 0 or m.occ[m.H :].min() == 1
    assert m.occ[:, m.W :].size == 0 or m.occ[:, m.W :].min() == 1
    assert m.occ.sum() == (m.G * m.G - m.H * m.W) + sum(v == 1 for row in mp for v in row)


@pytest.mark.parametrize("name", MAZE_NAMES)
@pytest.mark.parametrize("flip_y", [True, False])
def test_world_norm_round_trip(name, flip_y):
    m = get_maze(name, flip_y=flip_y)
    rng = np.random.default_rng(0)
    xy = rng.uniform(-6, 6, size=(50, 2))
    np.testing.assert_allclose(to_world(to_norm(xy, m), m), xy, atol=1e-12)
    p = rng.uniform(0, 1, size=(50, 2))
    np.testing.assert_allclose(to_norm(to_world(p, m), m), p, atol=1e-12)


def test_hand_computed_umaze_point():
    # U-maze is 5x5: cell (1,1) centre is world (1.5 - 2.5, 2.5 - 1.5) = (-1, 1)
    m = get_maze("umaze")
    np.testing.assert_allclose(to_norm([-1.0, 1.0], m), [1.5 / 12, 3.5 / 12])
    m2 = get_maze("umaze", flip_y=False)
    np.testing.assert_allclose(to_norm([-1.0, 1.0], m2), [1.5 / 12, 1.5 / 12])
    # y up in the flipped frame
    assert to_norm([0.0, 2.0], m)[1] > to_norm([0.0, 1.0], m)[1]


def test_d4rl_frame():
    gm, _ = _gym_maze("medium")
    m = get_maze("medium")
    for i, j in [(1, 1), (3, 4), (6, 6)]:
        np.testing.assert_allclose(d4rl_to_world([float(i), float(j)], m), gm.cell_rowcol_to_xy(np.array([i, j])))


def test_sdf_signs_hand_grid():
    occ = np.zeros((5, 5), dtype=np.float32)
    occ[2, 2] = 1  # a single wall block in the middle; the border counts as wall
    sdf = sdf_from_occupancy(occ)
    assert sdf[2, 2] == pytest.approx(-0.5)  # wall next to free cells
    assert sdf[1, 2] == pytest.approx(0.5)  # free, touching the wall
    assert sdf[0, 0] == pytest.approx(0.5)  # free, touching the outside
    big = np.zeros((7, 7), dtype=np.float32)
    big[3, 3] = 1
    s2 = sdf_from_occupancy(big)
    assert s2[1, 3] == pytest.approx(1.5)  # two cells from the wall, two from the border
    assert s2[2, 2] == pytest.approx(math.sqrt(2) - 0.5)
    solid = np.ones((5, 5), dtype=np.float32)
    solid[0, :] = 0
    s3 = sdf_from_occupancy(solid)
    assert s3[1, 2] == pytest.approx(-0.5) and s3[3, 2] == pytest.approx(-2.5)
    assert (sdf_from_occupancy(get_maze("large").occ) > 0).sum() == (get_maze("large").occ == 0).sum()


def test_wall_distance_matches_brute_force():
    m = get_maze("medium")
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, size=(400, 2))
    walls = np.argwhere(m.occ > 0.5)
    ref = np.empty(len(p))
    for n, (u, v) in enumerate(p):
        lo_u, lo_v = walls[:, 1] / m.G, walls[:, 0] / m.G
        du = np.maximum(np.maximum(lo_u - u, u - lo_u - 1 / m.G), 0)
        dv = np.maximum(np.maximum(lo_v - v, v - lo_v - 1 / m.G), 0)
        ref[n] = np.hypot(du, dv).min()
    got = wall_distance(p, m)
    near = ref < 2 / m.G
    np.testing.assert_allclose(got[near], ref[near], atol=1e-12)
    assert (got[~near] >= 2 / m.G - 1e-12).all()


def test_collides_with_radius():
    m = get_maze("umaze")
    c = m.cell_center_norm(np.array([1, 1]))  # free cell
    assert not collides(c[None], m)[0]
    r = m.radius_norm()  # 0.1 world / 12
    # left face of cell (1,1) is a wall (column 0): a point 0.05 world from it collides, 0.15 does not
    face_u = 1 / m.G
    assert collides(np.array([[face_u + 0.05 / 12, c[1]]]), m)[0]
    assert not collides(np.array([[face_u + 0.15 / 12, c[1]]]), m)[0]
    assert collides(np.array([[1.5, 0.5]]), m)[0]  # outside the grid
    assert r == pytest.approx(0.1 / 12)


def test_segment_crosses_wall():
    m = get_maze("umaze")
    # flipped U-maze: rows 1 and 3 are corridors, row 2 is wall except column 3
    a = m.cell_center_norm(np.array([1, 1]))
    b = m.cell_center_norm(np.array([3, 1]))  # straight through the wall at (2, 1)
    c = m.cell_center_norm(np.array([1, 3]))  # along the corridor
    assert segment_crosses_wall(a, b, m)
    assert not segment_crosses_wall(a, c, m)


@pytest.mark.parametrize("name", MAZE_NAMES)
def test_shortest_path_is_shortest(name):
    m = get_maze(name)
    free = m.free_cells()
    rng = np.random.default_rng(2)
    for _ in range(10):
        s, g = free[rng.integers(len(free))], free[rng.integers(len(free))]
        path = shortest_path(m, s, g)
        assert path[0] == tuple(s) and path[-1] == tuple(g)
        assert len(path) - 1 == bfs_distance(m.occ, g)[tuple(s)]
        for (r0, c0), (r1, c1) in zip(path, path[1:]):
            assert abs(r0 - r1) + abs(c0 - c1) == 1 and m.occ[r1, c1] == 0


def test_shortest_path_errors():
    occ = np.array([[0, 1, 0]], dtype=np.float32)
    with pytest.raises(ValueError, match="no path"):
        shortest_path(occ, (0, 0), (0, 2))
    with pytest.raises(ValueError, match="wall"):
        shortest_path(occ, (0, 1), (0, 2))
    with pytest.raises(ValueError, match="unknown maze"):
        get_maze("huge")
    with pytest.raises(ValueError, match="smaller than the map"):
        make_maze("x", [[1, 1, 1], [1, 0, 1]], G=2)


def test_geodesic_distance_matches_bfs():
    from maze.encoders import geodesic_distance

    occ = np.stack([get_maze(n).occ for n in MAZE_NAMES])
    goals = np.stack([get_maze(n).free_cells()[-1] for n in MAZE_NAMES])
    got = geodesic_distance(torch.from_numpy(occ), torch.from_numpy(goals)).numpy()
    for k in range(3):
        ref = bfs_distance(occ[k], goals[k])
        np.testing.assert_array_equal(got[k], ref)


def test_encoder_shapes_and_condition_dependence():
    from maze.encoders import MazeEncoder

    torch.manual_seed(0)
    enc = MazeEncoder(d_model=32, depth=1, heads=4)
    ms = [get_maze(n) for n in MAZE_NAMES]
    occ = torch.from_numpy(np.stack([m.occ for m in ms]))
    sdf = torch.from_numpy(np.stack([m.sdf for m in ms]))
    start = torch.from_numpy(np.stack([m.cell_center_norm(m.free_cells()[0]) for m in ms])).float()
    goal = torch.from_numpy(np.stack([m.cell_center_norm(m.free_cells()[-1]) for m in ms])).float()
    tokens, pooled = enc(occ, sdf, start, goal)
    assert tokens.shape == (3, 12 * 12 + 2, 32) and pooled.shape == (3, 32)
    assert not torch.allclose(pooled[0], pooled[1])
    _, pooled2 = enc(occ, sdf, start, start)  # moving the goal changes the pooled condition
    assert not torch.allclose(pooled, pooled2)
    with pytest.raises(ValueError, match="occupancy must be"):
        enc(occ[:, :10, :10], sdf[:, :10, :10], start, goal)
