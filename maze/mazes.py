"""Maze layouts, unified occupancy grids, SDF, coordinate frames, collisions and grid paths.

Layouts are the D4RL maze2d layouts as gymnasium-robotics ships them
(``gymnasium_robotics.envs.maze.maps.U_MAZE / MEDIUM_MAZE / LARGE_MAZE``; ``1`` = wall), with
the outer wall included. PointMaze (``PointMaze_*-v3``) uses ``maze_size_scaling = 1`` and
places the centre of map cell ``(row i, col j)`` at world ``x = (j + 0.5) s - W s / 2``,
``y = H s / 2 - (i + 0.5) s`` (``H x W`` map, ``s`` the scaling); the agent is a sphere of radius
0.1 (``point.xml``).

Unified grid ("pad-only unified"). Every maze lives on one ``G x G`` grid with
``G = max(H, W)`` over all mazes (12 for U/Medium/Large); a maze is not rescaled, its cells are
padded with walls. One grid cell is ``1 / G`` in normalised units in every maze, so distances
and speeds mean the same thing across mazes.

Normalised frame (``[0, 1]^2``, what data sets store). With ``u`` the horizontal and ``v`` the
vertical normalised coordinate::

    u = (x - x_min) / (G s),          x_min = -W s / 2
    flip_y=True  (default):  v = (y - y_min) / (G s),   y_min = -H s / 2   (v grows with world y)
    flip_y=False:            v = (y_max - y) / (G s),   y_max =  H s / 2   (v grows with map row)

The invariant in both cases: ``occ[floor(v G), floor(u G)]`` is the cell containing ``(u, v)``
(grids are indexed ``[row = v, col = u]``). With ``flip_y=True`` the stored grid is the map
flipped upside down (``occ[r] = maze_map[H - 1 - r]``), so ``imshow(occ, origin="lower")`` draws
the maze as MuJoCo shows it; with ``flip_y=False`` it is the map in reading order. Padding walls
fill rows ``r >= H`` and columns ``c >= W``.

SDF: grid distance in cells, positive in free cells, negative in walls:
``sdf = edt(free) - 0.5`` on free cells and ``-(edt(wall) - 0.5)`` on walls, where
``edt(free)`` is the Euclidean distance from a free cell's centre to the nearest wall cell's
centre (so a free cell next to a wall has 0.5 = the distance from its centre to the wall face).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

AGENT_RADIUS = 0.1  # world units: point.xml particle_geom sphere size
GOAL_CELL_NOISE = 0.25  # PointMaze's position_noise_range (fraction of a cell)


def _maps() -> dict[str, list[list]]:
    from gymnasium_robotics.envs.maze import maps

    return {"umaze": maps.U_MAZE, "medium": maps.MEDIUM_MAZE, "large": maps.LARGE_MAZE}


ENV_IDS = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3", "large": "PointMaze_Large-v3"}
MAZE_NAMES = ("umaze", "medium", "large")


@dataclass(frozen=True, eq=False)
class Maze:
    """One layout on the unified grid.

    ``grid_H_W``: the map (1 = wall) in map reading order (row 0 = top = largest world y).
    ``G``: unified grid size; ``scaling``: world size of a cell; ``flip_y``: see module doc.
    """

    name: str
    grid_H_W: np.ndarray
    G: int
    scaling: float = 1.0
    flip_y: bool = True
    env_id: str | None = None
    _occ: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def H(self) -> int:
        return int(self.grid_H_W.shape[0])

    @property
    def W(self) -> int:
        return int(self.grid_H_W.shape[1])

    @property
    def occ(self) -> np.ndarray:
        """Unified occupancy ``[G, G]`` float32 (1 = wall), indexed ``[row=v, col=u]``."""
        return self._occ

    @property
    def sdf(self) -> np.ndarray:
        """Signed distance ``[G, G]`` float32 in cells (see module doc)."""
        return sdf_from_occupancy(self.occ)

    def free_cells(self) -> np.ndarray:
        """``[n, 2]`` (row, col) of free cells of the unified grid."""
        return np.argwhere(self.occ < 0.5)

    def cell_center_norm(self, rc: np.ndarray) -> np.ndarray:
        """Centre of unified-grid cells ``(row, col)`` in normalised ``(u, v)``."""
        rc = np.asarray(rc, dtype=np.float64)
        return np.stack([(rc[..., 1] + 0.5) / self.G, (rc[..., 0] + 0.5) / self.G], -1)

    def cell_of(self, p_norm: np.ndarray) -> np.ndarray:
        """Unified-grid cell ``(row, col)`` (int64) containing normalised points ``[..., 2]``."""
        p = np.asarray(p_norm, dtype=np.float64)
        return np.stack([np.floor(p[..., 1] * self.G), np.floor(p[..., 0] * self.G)], -1).astype(np.int64)

    def radius_norm(self, radius_world: float = AGENT_RADIUS) -> float:
        return radius_world / (self.G * self.scaling)


def make_maze(name: str, grid, G: int | None = None, scaling: float = 1.0, flip_y: bool = True, env_id=None) -> Maze:
    """Build a ``Maze`` from a map (list of lists, ``1`` = wall, other entries free)."""
    rows = [[1 if (c == 1 or c == "1") else 0 for c in row] for row in grid]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"maze {name!r}: map must be a non-empty rectangular list of rows")
    g = np.array(rows, dtype=np.int64)
    H, W = g.shape
    G = max(H, W) if G is None else int(G)
    if G < max(H, W):
        raise ValueError(f"maze {name!r}: unified grid size G={G} is smaller than the map ({H}x{W})")
    occ = np.ones((G, G), dtype=np.float32)
    body = g[::-1] if flip_y else g
    occ[:H, :W] = body
    return Maze(name, g, G, float(scaling), bool(flip_y), env_id, occ)


@lru_cache(maxsize=None)
def _maze_cached(name: str, G: int | None, flip_y: bool) -> Maze:
    maps = _maps()
    if G is None:
        G = max(max(len(m), len(m[0])) for m in maps.values())
    return make_maze(name, maps[name], G=G, flip_y=flip_y, env_id=ENV_IDS[name])


def get_maze(name: str, G: int | None = None, flip_y: bool = True) -> Maze:
    """The named layout (``umaze``, ``medium``, ``large``) on the unified grid (default G=12)."""
    if name not in MAZE_NAMES:
        raise ValueError(f"unknown maze {name!r}; expected one of {list(MAZE_NAMES)}")
    return _maze_cached(name, G, bool(flip_y))


class _Mazes(dict):
    def __missing__(self, key):
        return get_maze(key)


MAZES: dict[str, Maze] = _Mazes()  # lazy: MAZES["large"] == get_maze("large")


def unified_size(names: Sequence[str]) -> int:
    maps = _maps()
    return max(max(len(maps[n]), len(maps[n][0])) for n in names)


# --------------------------------------------------------------------------- coordinates
def _frame(maze: Maze):
    s = maze.scaling
    return -maze.W * s / 2, -maze.H * s / 2, maze.H * s / 2, maze.G * s


def to_norm(xy_world, maze: Maze) -> np.ndarray:
    """World ``(x, y)`` of the PointMaze env -> normalised ``(u, v)`` (``[..., 2]``, float64)."""
    xy = np.asarray(xy_world, dtype=np.float64)
    x_min, y_min, y_max, L = _frame(maze)
    u = (xy[..., 0] - x_min) / L
    v = (xy[..., 1] - y_min) / L if maze.flip_y else (y_max - xy[..., 1]) / L
    return np.stack([u, v], -1)


def to_world(xy_norm, maze: Maze) -> np.ndarray:
    """Normalised ``(u, v)`` -> world ``(x, y)`` (inverse of ``to_norm``)."""
    p = np.asarray(xy_norm, dtype=np.float64)
    x_min, y_min, y_max, L = _frame(maze)
    x = p[..., 0] * L + x_min
    y = p[..., 1] * L + y_min if maze.flip_y else y_max - p[..., 1] * L
    return np.stack([x, y], -1)


def d4rl_to_world(xy_d4rl, maze: Maze) -> np.ndarray:
    """D4RL maze2d qpos -> gymnasium-robotics world frame.

    D4RL's ``maze_model`` puts map cell ``(i, j)`` at qpos ``(i, j) * scaling`` (x along rows,
    y along columns, cell centres at integers); gymnasium-robotics puts it at
    ``((j + .5) s - W s / 2, H s / 2 - (i + .5) s)``.
    """
    q = np.asarray(xy_d4rl, dtype=np.float64)
    s = maze.scaling
    i, j = q[..., 0] / s, q[..., 1] / s
    return np.stack([(j + 0.5) * s - maze.W * s / 2, maze.H * s / 2 - (i + 0.5) * s], -1)


# --------------------------------------------------------------------------- SDF
def sdf_from_occupancy(occ_G_G: np.ndarray) -> np.ndarray:
    """Signed grid distance (cells): ``edt - 0.5`` in free cells, ``-(edt - 0.5)`` in walls."""
    from scipy.ndimage import distance_transform_edt

    occ = np.asarray(occ_G_G) > 0.5
    if occ.all():
        raise ValueError("sdf_from_occupancy: grid has no free cell")
    # pad with walls so that free cells at the border see the outside as wall
    pad = np.pad(occ, 1, constant_values=True)
    d_free = distance_transform_edt(~pad)[1:-1, 1:-1]  # free cell -> nearest wall centre
    d_wall = distance_transform_edt(pad)[1:-1, 1:-1]  # wall cell -> nearest free centre
    return np.where(occ, -(d_wall - 0.5), d_free - 0.5).astype(np.float32)


# --------------------------------------------------------------------------- collisions
def _box_dist(p: np.ndarray, rc: np.ndarray, G: int) -> np.ndarray:
    """Distance (normalised) from points ``p [..., 2]`` to cell boxes ``rc [..., 2]``."""
    lo_u, lo_v = rc[..., 1] / G, rc[..., 0] / G
    du = np.maximum(np.maximum(lo_u - p[..., 0], p[..., 0] - (lo_u + 1 / G)), 0)
    dv = np.maximum(np.maximum(lo_v - p[..., 1], p[..., 1] - (lo_v + 1 / G)), 0)
    return np.hypot(du, dv)


def wall_distance(points_norm, maze_or_occ) -> np.ndarray:
    """Distance (normalised units) from each point to the nearest wall cell; 0 inside a wall.

    Looks at the 5 x 5 cells around each point (exact for distances below 2 cells, which is all
    a collision check needs; farther points get ``>= 2 / G``). Points outside ``[0, 1]^2`` are
    at distance 0 (outside the unified grid counts as wall).
    """
    occ = maze_or_occ.occ if isinstance(maze_or_occ, Maze) else np.asarray(maze_or_occ)
    G = occ.shape[0]
    p = np.asarray(points_norm, dtype=np.float64)
    shp = p.shape[:-1]
    p = p.reshape(-1, 2)
    cell = np.stack([np.floor(p[:, 1] * G), np.floor(p[:, 0] * G)], -1).astype(np.int64)
    off = np.stack(np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing="ij"), -1).reshape(-1, 2)
    rc = cell[:, None, :] + off[None]  # (n, 25, 2)
    inside = (rc >= 0).all(-1) & (rc < G).all(-1)
    rcc = rc.clip(0, G - 1)
    wall = np.where(inside, occ[rcc[..., 0], rcc[..., 1]] > 0.5, True)
    d = _box_dist(p[:, None, :], rc, G)
    d = np.where(wall, d, np.inf).min(1)
    d = np.minimum(d, 2.0 / G)
    out = ((p >= 0) & (p <= 1)).all(-1)
    return np.where(out, d, 0.0).reshape(shp)


def collides(points_norm, maze: Maze, radius: float | None = None) -> np.ndarray:
    """Bool per point: a disc of ``radius`` (normalised; default the agent's) overlaps a wall."""
    r = maze.radius_norm() if radius is None else float(radius)
    return wall_distance(points_norm, maze) < r


def segment_crosses_wall(p0, p1, maze: Maze, radius: float | None = None, step: float | None = None) -> np.ndarray:
    """Bool per segment ``p0[..., 2] -> p1[..., 2]``: does the swept disc touch a wall?

    Checked at points spaced by ``step`` (default a quarter cell, or ``radius`` when smaller)
    along the segment, endpoints included.
    """
    r = maze.radius_norm() if radius is None else float(radius)
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    step = step or min(0.25 / maze.G, max(r, 1e-3 / maze.G))
    n = int(np.ceil(np.max(np.linalg.norm(p1 - p0, axis=-1), initial=0.0) / step)) + 1
    w = np.linspace(0, 1, n + 1)
    pts = p0[..., None, :] * (1 - w[:, None]) + p1[..., None, :] * w[:, None]
    return collides(pts, maze, r).any(-1)


def trajectory_collides(pos_N_T_2: np.ndarray, maze_of_row: Sequence[Maze], radius: float | None = None) -> np.ndarray:
    """Bool ``[N]``: some stored point of trajectory ``n`` is closer than ``radius`` to a wall."""
    out = np.zeros(len(pos_N_T_2), dtype=bool)
    for n, (p, m) in enumerate(zip(pos_N_T_2, maze_of_row)):
        out[n] = bool(collides(p, m, radius).any())
    return out


# --------------------------------------------------------------------------- paths
_NB4 = ((-1, 0), (1, 0), (0, -1), (0, 1))


def bfs_distance(occ_G_G: np.ndarray, goal_rc) -> np.ndarray:
    """4-connected shortest-path length (cells) from every cell to ``goal_rc``; ``inf`` if unreachable/wall."""
    occ = np.asarray(occ_G_G) > 0.5
    G0, G1 = occ.shape
    dist = np.full(occ.shape, np.inf)
    r, c = int(goal_rc[0]), int(goal_rc[1])
    if occ[r, c]:
        raise ValueError(f"bfs_distance: goal cell {(r, c)} is a wall")
    dist[r, c] = 0
    q = deque([(r, c)])
    while q:
        r, c = q.popleft()
        for dr, dc in _NB4:
            rr, cc = r + dr, c + dc
            if 0 <= rr < G0 and 0 <= cc < G1 and not occ[rr, cc] and dist[rr, cc] == np.inf:
                dist[rr, cc] = dist[r, c] + 1
                q.append((rr, cc))
    return dist


def shortest_path(maze_or_occ, start_rc, goal_rc) -> list[tuple[int, int]]:
    """Shortest 4-connected cell path ``[start, ..., goal]`` on a grid (``1`` = wall).

    Steepest descent on ``bfs_distance`` to the goal; among equally short next cells the first
    of (row-1, row+1, col-1, col+1) wins. ``maze.encoders.path_prior`` breaks ties the same
    way on the same (unified) grid, so the data's controller and the condition-only prior follow
    the same path. Raises when a cell is a wall / outside the grid or no path exists.
    """
    occ = (maze_or_occ.occ if isinstance(maze_or_occ, Maze) else np.asarray(maze_or_occ)) > 0.5
    s = (int(start_rc[0]), int(start_rc[1]))
    g = (int(goal_rc[0]), int(goal_rc[1]))
    for name, rc in (("start", s), ("goal", g)):
        if not (0 <= rc[0] < occ.shape[0] and 0 <= rc[1] < occ.shape[1]) or occ[rc]:
            raise ValueError(f"shortest_path: {name} cell {rc} is outside the grid or a wall")
    dist = bfs_distance(occ, g)
    if not np.isfinite(dist[s]):
        raise ValueError(f"shortest_path: no path from {s} to {g}")
    path = [s]
    while path[-1] != g:
        r, c = path[-1]
        best = None
        for dr, dc in _NB4:
            rr, cc = r + dr, c + dc
            if 0 <= rr < occ.shape[0] and 0 <= cc < occ.shape[1] and (best is None or dist[rr, cc] < dist[best]):
                best = (rr, cc)
        path.append(best)
    return path
