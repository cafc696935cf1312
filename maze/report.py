"""Write ``<eval.run_dir>/report.md`` and its PNG figures from ``maze.evaluate``'s outputs.

    python -m maze.report --config configs/maze/small.yaml --config configs/maze/small_model.yaml

Figures (matplotlib, Agg):

- ``fig_samples.png``: eval mazes with the ground truth, the phase-1 keyframes, their
  interpolation, the refined (two-phase) plan and the baseline plan;
- ``fig_levels.png``: MSE and collision rate per level, interpolation vs refined, normal and
  oracle (the oracle rows test the refiner as it was trained);
- ``fig_gaps.png``: per-level gap histograms of the selector, uniform, random and DP masks
  (METHOD.md section 6: the gap tail drives phase-2 error);
- ``fig_training.png``: training curves of every stage (part 1's ``metrics.jsonl`` included);
- ``fig_closed_loop.png``: the first closed-loop plans per maze and method.

The acceptance checks of the issue are evaluated here from the measured numbers and printed
as PASS / MISS, never assumed. When step-distilled methods were evaluated (``maze.distill``), the
report opens with the milestone table of METHOD.md section 1 (``milestone_rows``, ``milestone``:
distilled two-phase vs the distilled full-sequence baseline, undistilled teachers for reference),
also written to ``<eval.run_dir>/milestone.json`` and printed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from interpdiff.io import atomic_write_text
from maze.config_model import load_maze_config

METHOD_LABEL = {
    "ground_truth": "ground truth (data)",
    "interp": "keyframes + interpolation (interp_only)",
    "refined": "two-phase (refined)",
    "oracle_interp": "oracle keyframes + interpolation",
    "oracle_refined": "oracle keyframes + refined",
    "interp_uniform": "uniform indices: keyframes + interpolation",
    "refined_uniform": "uniform indices: two-phase (refined)",
    "full": "full-sequence baseline",
    "full_distilled": "distilled full-sequence baseline (consistency student)",
    "two_phase_distilled": "distilled two-phase (phase-1 student + interpolation + phase-2 student)",
    "interp_distilled": "distilled phase-1 keyframes + interpolation",
}

# the milestone table's rows: (open-loop key, closed-loop / cost method, label)
MILESTONE_ROWS = [
    ("two_phase_distilled", "two_phase_distilled", "two-phase, distilled"),
    ("full_distilled", "full_distilled", "full-sequence, distilled"),
    ("interp_distilled", "interp_distilled", "distilled keyframes + interpolation (no phase 2)"),
    ("refined", "two_phase", "two-phase teacher (undistilled)"),
    ("full", "full", "full-sequence teacher (undistilled)"),
    ("interp", "interp_only", "keyframes + interpolation teacher (undistilled)"),
]
MILESTONE_FLOPS_RATIO = 0.5  # "clearly lower compute": at most half the distilled baseline's FLOPs per plan


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    import io

    from interpdiff.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def _draw_maze(ax, occ):
    ax.imshow(occ, origin="lower", extent=(0, 1, 0, 1), cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])


def fig_samples(arr, occ, names, out: Path, per_maze: int = 2) -> str | None:
    if "gt" not in arr:
        return None
    plt = _plt()
    mids = arr["maze_id"]
    picks = [i for m in range(len(names)) for i in np.flatnonzero(mids == m)[:per_maze]]
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), squeeze=False)
    for ax, i in zip(axes[0], picks):
        m = int(mids[i])
        _draw_maze(ax, occ[m])
        ax.plot(*arr["gt"][i].T, "k-", lw=2.5, alpha=0.35, label="ground truth")
        if "interp" in arr:
            ax.plot(*arr["interp"][i].T, "--", color="tab:orange", lw=1.2, label="interpolation")
            k = arr["masks"][i, 0]
            ax.plot(*arr["interp"][i][k].T, "o", color="tab:orange", ms=4, label="phase-1 keyframes")
        if "refined" in arr:
            ax.plot(*arr["refined"][i].T, "-", color="tab:blue", lw=1.3, label="refined (two-phase)")
        if "full" in arr:
            ax.plot(*arr["full"][i].T, "-", color="tab:green", lw=1.0, alpha=0.8, label="baseline")
        ax.plot(*arr["start"][i], "g^", ms=7)
        ax.plot(*arr["goal"][i], "r*", ms=9)
        g = occ[m].shape[0]
        H = max(np.flatnonzero((occ[m] < 0.5).any(1)).max() + 2, 3)
        W = max(np.flatnonzero((occ[m] < 0.5).any(0)).max() + 2, 3)
        ax.set_xlim(0, W / g), ax.set_ylim(0, H / g)
        ax.set_title(f"{names[m]} #{i}", fontsize=9)
    axes[0][0].legend(fontsize=6, loc="lower left")
    return _save(fig, out)


def fig_levels(res, out: Path) -> str | None:
    lv = res["open_loop"].get("levels")
    if not lv:
        return None
    plt = _plt()
    budgets = res["open_loop"]["budgets"][:-1]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for key, style in (("interp", "o--"), ("refined", "o-"), ("oracle_interp", "s--"), ("oracle_refined", "s-")):
        if key in lv:
            axes[0].plot(budgets, [r["mse"] for r in lv[key]], style, label=key)
            axes[1].plot(budgets, [r["collision"] for r in lv[key]], style, label=key)
    for ax, t in zip(axes, ("MSE to ground truth", "collision rate (plans)")):
        ax.set_xscale("log", base=2), ax.set_xlabel("level budget K_s"), ax.set_title(t, fontsize=10)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, out)


def fig_gaps(arr, out: Path) -> str | None:
    pols = [k[len("gapmask_"):] for k in arr if k.startswith("gapmask_")]
    if not pols:
        return None
    plt = _plt()
    S = arr[f"gapmask_{pols[0]}"].shape[1] - 1  # the last level (all frames) has gap 1
    fig, axes = plt.subplots(1, S, figsize=(3.2 * S, 3), squeeze=False)
    for s in range(S):
        ax = axes[0][s]
        allg = []
        for p in pols:
            m = arr[f"gapmask_{p}"][:, s]
            g = np.concatenate([np.diff(np.flatnonzero(r)) for r in m])
            allg.append(g)
        bins = np.arange(0.5, max(int(max(g.max() for g in allg)), 2) + 1.5, max(1, int(max(g.max() for g in allg)) // 30))
        for p, g in zip(pols, allg):
            ax.hist(g, bins=bins, histtype="step", density=True, label=f"{p} (max {g.max()})")
        ax.set_title(f"level {s}: K={int(arr[f'gapmask_{pols[0]}'][0, s].sum())}", fontsize=9)
        ax.set_xlabel("gap (frames)")
    axes[0][0].legend(fontsize=6)
    return _save(fig, out)


def read_curves(cfg) -> dict[str, tuple[list, list]]:
    curves = {}
    for name, d in (("phase1", cfg.phase1.run_dir), ("phase2", cfg.phase2.run_dir), ("baseline", cfg.baseline.run_dir)):
        p = Path(d) / "model_metrics.csv"
        if p.is_file():
            rows = list(csv.DictReader(p.open()))
            curves[name] = ([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    for name, d in (("dphi", cfg.dphi.run_dir), ("selector", cfg.selector.run_dir)):
        p = Path(d) / "metrics.jsonl"
        if p.is_file():
            recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            recs = [r for r in recs if "loss" in r]
            curves[name] = ([r["step"] for r in recs], [r.get("loss_avg", r["loss"]) for r in recs])
    return curves


def fig_training(curves, out: Path) -> str | None:
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (name, (x, y)) in zip(axes[0], curves.items()):
        ax.plot(x, y, "-")
        ax.set_title(name, fontsize=10), ax.set_xlabel("step")
        if min(y) > 0:
            ax.set_yscale("log")
    return _save(fig, out)


def fig_closed_loop(res, cfg, out: Path) -> str | None:
    cl = res.get("closed_loop")
    if not cl:
        return None
    from maze.mazes import get_maze, to_norm

    plt = _plt()
    fig, axes = plt.subplots(1, len(cl), figsize=(3.6 * len(cl), 3.6), squeeze=False)
    colors = {"two_phase": "tab:blue", "full": "tab:green", "interp_only": "tab:orange", "two_phase_uniform": "tab:purple"}
    for ax, (name, r) in zip(axes[0], cl.items()):
        m = get_maze(name, flip_y=cfg.data.flip_y)
        _draw_maze(ax, m.occ)
        for meth, plans in r["plans"].items():
            for j, p in enumerate(plans[:3]):
                ax.plot(*to_norm(np.array(p), m).T, "-", color=colors.get(meth, "k"), lw=1, alpha=0.8, label=meth if j == 0 else None)
        for s, g in zip(r["starts"][:3], r["goals"][:3]):
            ax.plot(*to_norm(np.array(s), m), "g^"), ax.plot(*to_norm(np.array(g), m), "r*")
        ax.set_xlim(0, (m.W + 0.5) / m.G), ax.set_ylim(0, (m.H + 0.5) / m.G)
        ax.set_title(f"{name}: closed-loop plans", fontsize=9)
    axes[0][0].legend(fontsize=6)
    return _save(fig, out)


# ----------------------------------------------------------------------------- markdown


def _f(v, fmt=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def acceptance(res) -> list[tuple[str, bool | None, str]]:
    """The issue's targets, checked on the measured numbers (None = could not be measured)."""
    out = []
    ol = res["open_loop"]
    lv = ol.get("levels", {})
    meth = ol["methods"]
    if "interp" in meth and "refined" in meth:
        ci, cr = meth["interp"]["collision"], meth["refined"]["collision"]
        out.append(("refined collision <= 0.5 x interpolation's (final plans)", cr <= 0.5 * ci, f"{cr:.3f} vs {ci:.3f}"))
    if lv.get("interp"):
        # Level s's input is the sampler's state (level 0: keyframes + interpolation; later levels: the
        # previous x0_hat re-interpolated), so once level 0 has removed the collisions a later level's
        # input has almost none and a ratio to it says nothing. Two checks instead: every level's output
        # stays at <= 0.5 x the plain interpolation's rate, and no level adds collisions to its input.
        c0 = lv["interp"][0]["collision"]
        bad = [s for s, b in enumerate(lv["refined"]) if b["collision"] > 0.5 * c0]
        out.append(("refined collision <= 0.5 x interpolation's at every level (x0_hat of level s vs keyframes + interpolation)",
                    not bad, "levels failing: " + (str(bad) if bad else "none")))
        added = [s for s, (a, b) in enumerate(zip(lv["interp"], lv["refined"])) if b["collision"] > a["collision"]]
        out.append(("no level adds collisions (x0_hat of level s vs its input)",
                    not added, "levels adding: " + (str(added) if added else "none")))
    if lv.get("oracle_interp"):
        worse = [s for s, (a, b) in enumerate(zip(lv["oracle_interp"], lv["oracle_refined"])) if b["mse"] > a["mse"]]
        out.append(("oracle refined never worse than oracle interpolation (MSE), every level", not worse,
                    "levels worse: " + (str(worse) if worse else "none")))
    cl, cost = res.get("closed_loop", {}), res.get("cost", {})
    for tp in ("two_phase", "two_phase_uniform"):
        if tp in cost and "full" in cost:
            fr = cost[tp]["flops"] / max(cost["full"]["flops"], 1)
            out.append((f"{tp} sampling FLOPs <= 1/3 of the baseline's", fr <= 1 / 3, f"ratio {fr:.3f}"))
        for name, r in cl.items():
            p = r["policies"]
            if tp in p and "full" in p:
                out.append((f"closed-loop success {tp} >= baseline ({name})", p[tp]["success"] >= p["full"]["success"],
                            f"{p[tp]['success']:.2f} vs {p['full']['success']:.2f} ({r['episodes']} episodes)"))
    return out


def milestone_rows(res) -> list[dict]:
    """Per method: open-loop collision / crossings / MSE, mean closed-loop success over mazes, FLOPs and
    network evaluations per plan (the methods present in ``res``)."""
    meth, cl, cost = res["open_loop"]["methods"], res.get("closed_loop", {}), res.get("cost", {})
    rows = []
    for key, m, label in MILESTONE_ROWS:
        if key not in meth:
            continue
        succ = [r["policies"][m]["success"] for r in cl.values() if m in r["policies"]]
        rows.append({"method": m, "label": label, "collision": meth[key]["collision"], "crossings": meth[key]["crossings"],
                     "mse": meth[key]["mse"], "success": float(np.mean(succ)) if succ else None,
                     "success_per_maze": {n: r["policies"][m]["success"] for n, r in cl.items() if m in r["policies"]},
                     "flops": cost.get(m, {}).get("flops"), "nfe": cost.get(m, {}).get("nfe_total"),
                     "nfe_by_model": cost.get(m, {}).get("nfe")})
    return rows


def milestone(res) -> list[tuple[str, bool | None, str]]:
    """METHOD.md section 1's milestone on the maze: the distilled two-phase planner against the distilled
    full-sequence baseline. Quality: each open-loop rate / MSE no worse than the baseline's, closed-loop
    success no lower in any maze; compute: FLOPs per plan <= ``MILESTONE_FLOPS_RATIO`` x the baseline's."""
    meth, cl, cost = res["open_loop"]["methods"], res.get("closed_loop", {}), res.get("cost", {})
    a, b = "two_phase_distilled", "full_distilled"
    if a not in meth or b not in meth:
        return []
    out = []
    for k, fmt in (("collision", ".3f"), ("crossings", ".3f"), ("mse", ".2e")):
        va, vb = meth[a][k], meth[b][k]
        out.append((f"(a) {k}: two-phase distilled <= full-sequence distilled", va <= vb,
                    f"{va:{fmt}} vs {vb:{fmt}} (ratio {va / vb:.2f})" if vb > 0 else f"{va:{fmt}} vs {vb:{fmt}}"))
    for name, r in cl.items():
        p = r["policies"]
        if a in p and b in p:
            out.append((f"(a) closed-loop success ({name}): two-phase distilled >= full-sequence distilled",
                        p[a]["success"] >= p[b]["success"],
                        f"{p[a]['success']:.2f} vs {p[b]['success']:.2f} ({r['episodes']} episodes)"))
    if a in cost and b in cost:
        fr = cost[a]["flops"] / max(cost[b]["flops"], 1)
        out.append((f"(b) FLOPs per plan: two-phase distilled <= {MILESTONE_FLOPS_RATIO} x full-sequence distilled",
                    fr <= MILESTONE_FLOPS_RATIO, f"{cost[a]['flops'] / 1e6:.1f} M vs {cost[b]['flops'] / 1e6:.1f} M "
                    f"(ratio {fr:.3f}); NFE {cost[a]['nfe_total']} vs {cost[b]['nfe_total']}"))
    return out


def milestone_markdown(res) -> list[str]:
    """The milestone section (table + checks); empty when no distilled method was evaluated."""
    rows = milestone_rows(res)
    if not any(r["method"].endswith("_distilled") for r in rows):
        return []
    L = ["## Step distillation milestone (METHOD.md section 1)", "",
         f"Open loop: {res['open_loop']['n']} eval plans; closed-loop success: mean over mazes; FLOPs / NFE per plan "
         "(batch 1). Students from `maze.distill`.", "",
         "| method | collision | crossings | MSE to GT | closed-loop success | FLOPs / plan | NFE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        nfe = "n/a" if r["nfe"] is None else f"{r['nfe']} (" + ", ".join(f"{m} {n}" for m, n in r["nfe_by_model"].items()) + ")"
        fl = "n/a" if r["flops"] is None else f"{r['flops'] / 1e6:.1f} M"
        L.append(f"| {r['label']} | {_f(r['collision'])} | {_f(r['crossings'])} | {_f(r['mse'], '.2e')} | {_f(r['success'], '.2f')} | "
                 f"{fl} | {nfe} |")
    checks = milestone(res)
    if checks:
        L += ["", "| milestone check | result | numbers |", "|---|---|---|"]
        L += [f"| {name} | {'PASS' if ok else 'MISS'} | {nums} |" for name, ok, nums in checks]
    return L + [""]


def write_report(cfg, res=None, arr=None, stage_times: dict | None = None) -> Path:
    rd = Path(cfg.eval.run_dir)
    if res is None:
        p = rd / "eval.json"
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} does not exist (run `python -m maze.evaluate` first)")
        res = json.loads(p.read_text())
    if arr is None:
        p = rd / "eval_samples.npz"
        arr = dict(np.load(p)) if p.is_file() else {}
    from maze.data import load_split

    data = load_split(cfg.data.root, cfg.eval.split, keyframes=False)
    figs = {
        "samples": fig_samples(arr, data.occ, data.maze_names, rd / "fig_samples.png"),
        "levels": fig_levels(res, rd / "fig_levels.png"),
        "gaps": fig_gaps(arr, rd / "fig_gaps.png"),
        "training": fig_training(read_curves(cfg), rd / "fig_training.png"),
        "closed": fig_closed_loop(res, cfg, rd / "fig_closed_loop.png"),
    }
    L = [f"# Maze prototype report: `{rd}`", ""]
    L += ["Interpolated Diffusion on gymnasium-robotics PointMaze (U-maze, Medium, Large): selector keyframe indices -> "
          "phase-1 keyframe diffusion -> linear interpolation -> phase-2 level-wise refinement (TACoS), against a "
          "Diffuser-style full-sequence diffusion baseline trained on the same data.", ""]
    st = res.get("config", {}).get("settings", {})
    L += [f"- data: `{cfg.data.root}` ({cfg.eval.split} split), T = {data.T}, budgets {res['open_loop'].get('budgets')}",
          f"- keyframe indices at sampling: `{res['config'].get('index_source')}` (selector loaded: {res['config'].get('selector')})",
          f"- sampling: phase-1 {st.get('phase1_steps')} Euler steps, phase-2 noise `{st.get('noise')}`, anchor confidence "
          f"`{st.get('confidence')}`, baseline {st.get('baseline_steps')} Euler steps", ""]
    L += ["## Acceptance checks (measured)", "", "| target | result | numbers |", "|---|---|---|"]
    for name, ok, nums in acceptance(res):
        L.append(f"| {name} | {'PASS' if ok else 'MISS'} | {nums} |")
    ms = milestone_markdown(res)
    if ms:
        L += [""] + ms
        atomic_write_text(rd / "milestone.json", json.dumps({"rows": milestone_rows(res), "checks": [
            {"check": n, "pass": ok, "numbers": v} for n, ok, v in milestone(res)]}, indent=1))
    ol = res["open_loop"]
    L += ["", f"## Open loop (eval split, {ol['n']} trajectories, agent radius {ol['radius_world']} world units)", "",
          "| method | collision (plans) | collision (points) | wall crossings (plans) | crossings / plan | MSE to GT | goal err (world) | length / shortest |",
          "|---|---|---|---|---|---|---|---|"]
    for k, v in ol["methods"].items():
        L.append(f"| {METHOD_LABEL.get(k, k)} | {_f(v['collision'])} | {_f(v['collision_pts'], '.4f')} | {_f(v['crossings'])} | "
                 f"{_f(v['crossings_per_plan'], '.2f')} | {_f(v['mse'], '.2e')} | {_f(v['goal_err'])} | {_f(v['len_ratio'], '.2f')} |")
    if "keyframe_collision" in ol:
        L += ["", f"Plans with a phase-1 keyframe within the agent radius of a wall: {ol['keyframe_collision']:.3f} "
              "(keyframes stay clamped through phase 2, so this bounds the refined collision rate from below)."]
    pm = {k: v["per_maze"] for k, v in ol["methods"].items() if "per_maze" in v}
    if pm:
        names = list(next(iter(pm.values())).keys())
        L += ["", "Per maze (collision rate of plans / MSE):", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
        for k, v in pm.items():
            L.append(f"| {METHOD_LABEL.get(k, k)} | " + " | ".join(f"{v[n]['collision']:.3f} / {v[n]['mse']:.1e}" for n in names) + " |")
    if ol.get("levels"):
        b = ol["budgets"]
        L += ["", "### Per level", "",
              "`interp_s`: the sampler's state at level s (oracle: `I(x*, M_s)`, teacher-forced); `refined_s`: the refiner's "
              "x0_hat from it.", "",
              "| level | K_s | interp collision | refined collision | interp MSE | refined MSE | oracle interp collision | "
              "oracle refined collision | oracle interp MSE | oracle refined MSE |", "|---|---|---|---|---|---|---|---|---|---|"]
        lv = ol["levels"]
        for s in range(len(lv["interp"])):
            L.append(f"| {s} | {b[s]} | {_f(lv['interp'][s]['collision'])} | {_f(lv['refined'][s]['collision'])} | "
                     f"{_f(lv['interp'][s]['mse'], '.2e')} | {_f(lv['refined'][s]['mse'], '.2e')} | "
                     f"{_f(lv['oracle_interp'][s]['collision'])} | {_f(lv['oracle_refined'][s]['collision'])} | "
                     f"{_f(lv['oracle_interp'][s]['mse'], '.2e')} | {_f(lv['oracle_refined'][s]['mse'], '.2e')} |")
    if res.get("gaps"):
        L += ["", "### Keyframe gaps per level and policy (eval split)", "",
              "| policy | " + " | ".join(f"K={g['budget']}" for g in next(iter(res["gaps"].values()))[:-1]) + " |",
              "|---|" + "---|" * (len(next(iter(res["gaps"].values()))) - 1)]
        for pol, gs in res["gaps"].items():
            L.append(f"| {pol} (mean max gap / max / p95) | " +
                     " | ".join(f"{g['mean_max_gap']:.1f} / {g['max_gap']} / {g['p95_gap']:.0f}" for g in gs[:-1]) + " |")
    if res.get("cost"):
        L += ["", "## Sampling cost per plan (batch 1, CPU)", "", "| method | network evaluations | FLOPs | wall time |", "|---|---|---|---|"]
        for k, v in res["cost"].items():
            nfe = ", ".join(f"{m} {n}" for m, n in v["nfe"].items())
            L.append(f"| {k} | {v['nfe_total']} ({nfe}) | {v['flops'] / 1e6:.1f} M | {v['wall_s'] * 1e3:.1f} ms |")
        bd = {k: v["flops_breakdown"] for k, v in res["cost"].items() if "flops_breakdown" in v}
        if bd:
            L += ["", "FLOPs breakdown (M): index selection (selector or uniform) / D_phi keyframe features / phase-1 + phase-2:", ""]
            L += [f"- {k}: " + " / ".join(f"{x / 1e6:.1f}" for x in v.values()) for k, v in bd.items()]
    cl = res.get("closed_loop")
    if cl:
        L += ["", "## Closed loop in PointMaze (PD controller following the plan)", "",
              "Success: within 0.45 of the goal at some step of the horizon. Score: `100 (R - R_random) / (R_expert - R_random)`, "
              "R = steps at the goal; R_random (uniform random actions) and R_expert (waypoint controller) measured on the same "
              "episodes.", "",
              "| maze | episodes | horizon | " + " | ".join(f"{p} success / score" for p in next(iter(cl.values()))["policies"]) + " |",
              "|---|---|---|" + "---|" * len(next(iter(cl.values()))["policies"])]
        for name, r in cl.items():
            L.append(f"| {name} | {r['episodes']} | {r['horizon']} | " +
                     " | ".join(f"{v['success']:.2f} / {_f(v['score'], '.1f')}" for v in r["policies"].values()) + " |")
    if stage_times:
        L += ["", "## Stage times (this machine)", "", "| stage | seconds |", "|---|---|"]
        L += [f"| {k} | {v:.0f} |" for k, v in stage_times.items()]
    L += ["", "## Figures", ""]
    caps = {"samples": "Eval samples: ground truth (grey), phase-1 keyframes + interpolation (orange), refined (blue), baseline (green).",
            "levels": "Per-level MSE and collision: interpolation vs refined, normal and oracle.",
            "gaps": "Per-level keyframe gap histograms by policy.",
            "training": "Training curves (loss vs step).",
            "closed": "Closed-loop plans (first episodes)."}
    for k, f in figs.items():
        if f:
            L += [f"![{caps[k]}]({f})", "", caps[k], ""]
    L += ["## Reproduce", "", "```", "python -m maze.demo --config configs/maze/small.yaml", "# or stage by stage:",
          "python -m maze.evaluate --config configs/maze/small.yaml --config configs/maze/small_model.yaml",
          "python -m maze.report --config configs/maze/small.yaml --config configs/maze/small_model.yaml", "```", ""]
    path = rd / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path


def main(cfg) -> Path:
    tp = Path(cfg.eval.run_dir) / "demo_times.json"  # stage times of maze.demo, when it ran here
    p = write_report(cfg, stage_times=json.loads(tp.read_text()) if tp.is_file() else None)
    ms = milestone_markdown(json.loads((Path(cfg.eval.run_dir) / "eval.json").read_text()))
    if ms:
        print("\n".join(ms))
    print(f"[maze.report] -> {p}")
    return p


if __name__ == "__main__":
    from maze.common import run_cli

    run_cli("maze.report", lambda: main(load_maze_config(sys.argv[1:])))
