"""Nested keyframe masks, budget schedules, index-policy mixes and gap statistics.

A level schedule is a strictly increasing list of budgets ``K_0 < K_1 < ... < K_S`` (the last
one usually ``T``); a nested mask stack is a bool ``mask_B_S_T`` with
``mask[:, s] ⊆ mask[:, s+1]``, ``mask[:, s].sum(-1) == K_s`` and frames 0 and ``T-1`` always
set. Every policy here returns such a stack:

- ``uniform_nested_masks``: level 0 is ``round(linspace(0, T-1, K_0))``; each later level adds
  frames one at a time at the midpoint of the currently largest gap (leftmost on ties), which
  keeps every level as close to uniform as nesting allows.
- ``random_nested_masks``: one random priority per interior frame; level s holds the
  endpoints and the ``K_s - 2`` frames of highest priority.
- ``dp_nested_masks``: ``interpdiff.selection.dp_select_levels`` on a cost matrix.
- ``selector_nested_masks``: level 0 takes the top ``K_0 - 2`` interior frames by the level-0
  logits; level s keeps level s-1 and adds the top ``K_s - K_{s-1}`` new frames by the level-s
  logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from interpdiff.selection import check_budgets, dp_select_levels

POLICIES = ("uniform", "random", "random_nested", "dp", "dp_precomputed", "selector")


def budget_schedule(T: int, k_min: int, n_levels: int, include_full: bool = True) -> list[int]:
    """Geometric budgets from ``k_min`` to ``T`` with ``n_levels`` levels (rounded, deduplicated).

    ``budget_schedule(128, 8, 5) -> [8, 16, 32, 64, 128]``.
    """
    if not 2 <= k_min <= T:
        raise ValueError(f"budget_schedule: k_min must lie in [2, T={T}], got {k_min}")
    if n_levels < 1:
        raise ValueError(f"budget_schedule: n_levels must be >= 1, got {n_levels}")
    if n_levels == 1:
        return [k_min]
    top = T if include_full else T - 1
    ks = [round(k_min * (top / k_min) ** (s / (n_levels - 1))) for s in range(n_levels)]
    out: list[int] = []
    for k in ks:
        k = max(k, out[-1] + 1 if out else k_min)
        out.append(min(k, top))
    if len(set(out)) != len(out):
        raise ValueError(f"budget_schedule: T={T}, k_min={k_min} cannot hold {n_levels} distinct levels")
    return out


def level_budgets(T: int, k_min: int, n_levels: int, budgets: Sequence[int] = (), key: str = "budgets") -> list[int]:
    """The level budgets of a clip of ``T`` frames: explicit ``budgets`` (strictly increasing,
    from >= 2 up to ``T``; ``key`` names them in the error) or ``budget_schedule(T, min(k_min, T),
    n_levels)`` (the rule of ``phase2`` in the video configs, the selector and the D_phi masks)."""
    if budgets:
        b = [int(x) for x in budgets]
        if b[-1] != T or b[0] < 2 or any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"{key}={b}: expected strictly increasing budgets from >= 2 up to T={T}")
        return b
    try:
        return budget_schedule(T, min(k_min, T), n_levels)
    except ValueError as e:
        sec = key.rsplit(".", 1)[0] + "." if "." in key else ""
        clamp = f" (k_min is capped at T={T})" if k_min > T else ""
        raise ValueError(f"{sec}k_min={k_min}, {sec}n_levels={n_levels}: a clip of T={T} frames cannot hold "
                         f"{n_levels} distinct levels from k_min{clamp}; lower them or set {key} explicitly "
                         f"({e})") from None


def uniform_indices(T: int, k: int) -> torch.Tensor:
    """``round(linspace(0, T-1, k))`` as a long tensor (distinct for ``k <= T``)."""
    return torch.linspace(0, T - 1, k, dtype=torch.float64).round().long()


def _endpoint_mask(B: int, T: int, device) -> torch.Tensor:
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    m[:, 0] = True
    m[:, -1] = True
    return m


def fill_largest_gaps(mask_B_T: torch.Tensor, n_add: int) -> torch.Tensor:
    """Add ``n_add`` frames, each at the midpoint of the largest gap (leftmost on ties)."""
    from interpdiff.interpolate import neighbours

    mask = mask_B_T.clone()
    B, T = mask.shape
    rows = torch.arange(B, device=mask.device)
    t = torch.arange(T, device=mask.device).expand(B, T)
    for _ in range(n_add):
        left, right, _ = neighbours(mask)
        gap = (right - left).masked_fill(mask, -1)
        mid = (left + right) // 2
        # score each non-keyframe: only the midpoint of its gap counts, larger gaps first
        score = torch.where(t == mid, gap, torch.full_like(gap, -1))
        pick = score.argmax(dim=1)
        mask[rows, pick] = True
    return mask


def uniform_nested_masks(B: int, T: int, budgets: Sequence[int], device=None) -> torch.Tensor:
    budgets = check_budgets(budgets, T, "uniform_nested_masks")
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    m[:, uniform_indices(T, budgets[0]).to(m.device)] = True
    levels = [m]
    for k_prev, k in zip(budgets, budgets[1:]):
        levels.append(fill_largest_gaps(levels[-1], k - k_prev))
    return torch.stack(levels, 1)


def random_nested_masks(
    B: int, T: int, budgets: Sequence[int], generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    budgets = check_budgets(budgets, T, "random_nested_masks")
    prio = torch.rand(B, T, generator=generator, device=device)
    prio[:, 0] = prio[:, -1] = 2.0  # endpoints first
    rank = prio.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = highest priority
    return torch.stack([rank < k for k in budgets], 1)


def dp_nested_masks(cost_B_T_T: torch.Tensor, budgets: Sequence[int], backend: str = "auto") -> torch.Tensor:
    return dp_select_levels(cost_B_T_T, budgets, backend=backend)


def selector_nested_masks(logits: torch.Tensor, budgets: Sequence[int]) -> torch.Tensor:
    """Nested masks from selector logits ``[B, S, T]`` (one row per level) or ``[B, T]`` (shared)."""
    if logits.dim() == 2:
        logits = logits[:, None].expand(-1, len(budgets), -1)
    if logits.dim() != 3 or logits.shape[1] != len(budgets):
        raise ValueError(
            f"selector_nested_masks: logits must be [B, S={len(budgets)}, T] or [B, T], got {list(logits.shape)}"
        )
    B, S, T = logits.shape
    budgets = check_budgets(budgets, T, "selector_nested_masks")
    mask = _endpoint_mask(B, T, logits.device)
    n_have = 2
    levels = []
    for s, k in enumerate(budgets):
        score = logits[:, s].float().masked_fill(mask, -math.inf)
        n_add = k - n_have
        if n_add > 0:
            top = score.topk(n_add, dim=1).indices
            mask = mask.clone()
            mask.scatter_(1, top, True)
        n_have = k
        levels.append(mask)
    return torch.stack(levels, 1)


def mask_to_indices(mask_B_T: torch.Tensor) -> torch.Tensor:
    """Sorted keyframe indices ``[B, K]``; every row must hold the same number of keyframes."""
    counts = mask_B_T.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"mask_to_indices: rows hold different keyframe counts {counts.unique().tolist()}")
    k = int(counts[0])
    t = torch.arange(mask_B_T.shape[1], device=mask_B_T.device).expand_as(mask_B_T)
    return torch.where(mask_B_T, t, torch.full_like(t, mask_B_T.shape[1])).sort(1).values[:, :k]


def check_nested(mask_B_S_T: torch.Tensor, budgets: Sequence[int] | None = None) -> None:
    """Raise when a mask stack is not nested, misses an endpoint, or has wrong counts."""
    m = mask_B_S_T
    if not bool((m[:, :, 0] & m[:, :, -1]).all()):
        raise ValueError("mask stack: an endpoint is missing at some level")
    if not bool((m[:, :-1] <= m[:, 1:]).all()):
        raise ValueError("mask stack: levels are not nested (some level drops a keyframe of the previous one)")
    if budgets is not None:
        want = torch.as_tensor(list(budgets), device=m.device)
        got = m.sum(-1)
        if not bool((got == want).all()):
            raise ValueError(f"mask stack: keyframe counts {got[0].tolist()} (first row) differ from budgets {list(budgets)}")


def gaps(mask_B_T: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample gaps (differences of consecutive keyframe indices)."""
    t = torch.arange(mask_B_T.shape[1], device=mask_B_T.device)
    return [t[row].diff() for row in mask_B_T]


@dataclass
class GapStats:
    budget: int
    mean_gap: float  # mean over samples of the mean gap (= (T-1)/(K-1) for every policy)
    mean_max_gap: float  # mean over samples of the largest gap
    max_gap: int  # largest gap over the batch
    p95_gap: float  # 95th percentile of all gaps


def gap_stats(mask_B_S_T: torch.Tensor) -> list[GapStats]:
    """Gap statistics per level of a nested mask stack."""
    out = []
    for s in range(mask_B_S_T.shape[1]):
        g = gaps(mask_B_S_T[:, s])
        allg = torch.cat(g).float()
        maxes = torch.stack([x.max() for x in g]).float()
        out.append(
            GapStats(
                budget=int(mask_B_S_T[0, s].sum()),
                mean_gap=float(allg.mean()),
                mean_max_gap=float(maxes.mean()),
                max_gap=int(maxes.max()),
                p95_gap=float(allg.quantile(0.95)),
            )
        )
    return out


def parse_policy_mix(spec: str | dict, allowed: Sequence[str] = POLICIES) -> dict[str, float]:
    """``"dp:0.7,uniform:0.2,random:0.1"`` -> normalised ``{policy: prob}``; names are checked."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if ":" not in part:
                raise ValueError(f"policy mix {spec!r}: entry {part!r} is not 'name:weight'")
            name, w = part.split(":", 1)
            try:
                items.append((name.strip(), float(w)))
            except ValueError:
                raise ValueError(f"policy mix {spec!r}: weight {w!r} of {name!r} is not a number") from None
    mix: dict[str, float] = {}
    for name, w in items:
        if name not in allowed:
            raise ValueError(f"policy mix {spec!r}: unknown policy {name!r}; expected one of {list(allowed)}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"policy mix {spec!r}: weight of {name!r} is {w}; expected a finite number >= 0")
        mix[name] = mix.get(name, 0.0) + float(w)
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"policy mix {spec!r}: weights sum to zero")
    return {k: v / total for k, v in mix.items() if v > 0}


def sample_policy(mix: dict[str, float], generator: torch.Generator | None = None) -> str:
    names = list(mix)
    probs = torch.tensor([mix[n] for n in names])
    return names[int(torch.multinomial(probs, 1, generator=generator))]
