"""Interpolated Diffusion: keyframes by diffusion, interpolation, then a level-wise refiner.

Modules: ``interpolate`` (I(x, M)), ``selection`` (segment costs, DP), ``masks`` (nested
keyframe masks, policies, gap statistics), ``corruption`` (phase-2 forward and TACoS step),
``flow`` (flow matching, shift, TrigFlow), ``config`` (dataclass + YAML configs), ``io``
(atomic writes, checkpoints), ``video`` (Wan2.1 through diffusers).
"""

__version__ = "0.1.0"
