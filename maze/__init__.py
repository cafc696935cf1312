"""Low-dimensional prototype of Interpolated Diffusion on gymnasium-robotics PointMaze.

Public entry point: ``maze.Planner.from_checkpoint(run_dir)`` (imported lazily so that
``python -m maze.generate`` and friends do not pay for the model code).
"""


def __getattr__(name):
    if name == "Planner":
        from maze.planner import Planner

        return Planner
    raise AttributeError(f"module 'maze' has no attribute {name!r}")
