"""``maze.report.acceptance``: the issue's checks on hand-built measurements."""

from maze.report import acceptance


def _lv(*collisions, mse=1e-4):
    return [{"collision": c, "mse": mse} for c in collisions]


def _res(interp, refined, o_interp_mse, o_refined_mse, final=(0.04, 0.01)):
    return {"open_loop": {
        "methods": {"interp": {"collision": final[0]}, "refined": {"collision": final[1]}},
        "levels": {"interp": _lv(*interp), "refined": _lv(*refined),
                   "oracle_interp": [{"collision": 0, "mse": m} for m in o_interp_mse],
                   "oracle_refined": [{"collision": 0, "mse": m} for m in o_refined_mse]},
    }}


def rows(res):
    return {name.split(" (")[0]: (ok, txt) for name, ok, txt in acceptance(res)}


def test_levels_compare_with_the_plain_interpolation_and_with_their_own_input():
    # level 0 removes most collisions; later inputs have the one left, kept: passes both level checks
    r = rows(_res([0.04, 0.004, 0.004], [0.004, 0.004, 0.004], [3e-4, 2e-5, 1e-6], [2e-4, 1e-5, 9e-7]))
    assert r["refined collision <= 0.5 x interpolation's"] == (True, "0.010 vs 0.040")
    assert r["refined collision <= 0.5 x interpolation's at every level"][0] is True
    assert r["no level adds collisions"][0] is True
    assert r["oracle refined never worse than oracle interpolation"][0] is True
    # level 2 adds collisions (0.004 -> 0.03, above half of 0.04): both level checks fail and name level 2;
    # oracle level 1 is worse in MSE
    r = rows(_res([0.04, 0.004, 0.004], [0.004, 0.004, 0.03], [3e-4, 2e-5, 1e-6], [2e-4, 3e-5, 9e-7], final=(0.04, 0.03)))
    assert r["refined collision <= 0.5 x interpolation's"][0] is False
    assert r["refined collision <= 0.5 x interpolation's at every level"] == (False, "levels failing: [2]")
    assert r["no level adds collisions"] == (False, "levels adding: [2]")
    assert r["oracle refined never worse than oracle interpolation"] == (False, "levels worse: [1]")
