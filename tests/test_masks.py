import pytest
import torch

from interpdiff.masks import (
    budget_schedule,
    check_nested,
    dp_nested_masks,
    gap_stats,
    mask_to_indices,
    parse_policy_mix,
    random_nested_masks,
    selector_nested_masks,
    uniform_indices,
    uniform_nested_masks,
)
from interpdiff.selection import segment_costs

BUDGETS = [4, 7, 13, 25, 33]


def all_policies(B=6, T=33):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 2, generator=gen).cumsum(1)
    return {
        "uniform": uniform_nested_masks(B, T, BUDGETS),
        "random": random_nested_masks(B, T, BUDGETS, generator=gen),
        "dp": dp_nested_masks(segment_costs(x), BUDGETS),
        "selector_levels": selector_nested_masks(torch.randn(B, len(BUDGETS), T, generator=gen), BUDGETS),
        "selector_shared": selector_nested_masks(torch.randn(B, T, generator=gen), BUDGETS),
    }


@pytest.mark.parametrize("policy", list(all_policies()))
def test_every_policy_is_nested_with_endpoints_and_budgets(policy):
    m = all_policies()[policy]
    assert m.shape == (6, len(BUDGETS), 33) and m.dtype == torch.bool
    check_nested(m, BUDGETS)  # raises on any violation
    for s in range(len(BUDGETS) - 1):
        assert torch.all(m[:, s] <= m[:, s + 1])
    assert torch.all(m[:, :, 0]) and torch.all(m[:, :, -1])
    assert torch.all(m.sum(-1) == torch.tensor(BUDGETS))


def test_check_nested_catches_violations():
    m = uniform_nested_masks(2, 17, [3, 5, 9])
    bad = m.clone()
    bad[0, 1, 8] = False  # level 1 drops a keyframe of level 0
    bad[0, 1, 2] = True  # (same count, so only nesting is violated)
    with pytest.raises(ValueError):
        check_nested(bad, [3, 5, 9])
    bad2 = m.clone()
    bad2[1, 2, 0] = False
    with pytest.raises(ValueError, match="endpoint"):
        check_nested(bad2)


def test_uniform_level0_and_gap_filling():
    m = uniform_nested_masks(1, 17, [3, 5, 9, 17])
    assert m[0, 0].nonzero().flatten().tolist() == [0, 8, 16]
    assert m[0, 1].nonzero().flatten().tolist() == [0, 4, 8, 12, 16]
    assert m[0, 2].nonzero().flatten().tolist() == list(range(0, 17, 2))
    assert uniform_indices(128, 8).tolist() == [0, 18, 36, 54, 73, 91, 109, 127]


def test_selector_picks_top_logits():
    logits = torch.zeros(1, 2, 10)
    logits[0, 0, 6] = 5.0
    logits[0, 1, 2] = 4.0
    logits[0, 1, 6] = 9.0  # already a keyframe: must not count twice
    logits[0, 1, 3] = 3.0
    m = selector_nested_masks(logits, [3, 5])
    assert m[0, 0].nonzero().flatten().tolist() == [0, 6, 9]
    assert m[0, 1].nonzero().flatten().tolist() == [0, 2, 3, 6, 9]


def test_gap_stats_hand_case():
    m = torch.zeros(2, 1, 11, dtype=torch.bool)
    m[0, 0, [0, 5, 10]] = True  # gaps 5, 5
    m[1, 0, [0, 1, 10]] = True  # gaps 1, 9
    (g,) = gap_stats(m)
    assert g.budget == 3
    assert g.mean_gap == pytest.approx(5.0)
    assert g.mean_max_gap == pytest.approx(7.0)
    assert g.max_gap == 9


def test_budget_schedule_and_indices():
    assert budget_schedule(128, 8, 5) == [8, 16, 32, 64, 128]
    assert budget_schedule(21, 6, 2) == [6, 21]
    with pytest.raises(ValueError, match="k_min"):
        budget_schedule(10, 1, 3)
    m = uniform_nested_masks(3, 9, [3])[:, 0]
    assert mask_to_indices(m).tolist() == [[0, 4, 8]] * 3


def test_policy_mix_parsing():
    assert parse_policy_mix("dp:0.7,uniform:0.2,random:0.1") == pytest.approx({"dp": 0.7, "uniform": 0.2, "random": 0.1})
    assert parse_policy_mix("dp:2,uniform:2") == {"dp": 0.5, "uniform": 0.5}
    with pytest.raises(ValueError, match="unknown policy 'dpp'"):
        parse_policy_mix("dpp:1")
    with pytest.raises(ValueError, match="not a number"):
        parse_policy_mix("dp:x")


def test_level_budgets_rule_and_errors():
    from interpdiff.masks import budget_schedule, level_budgets

    assert level_budgets(21, 6, 4) == budget_schedule(21, 6, 4) == [6, 9, 14, 21]
    assert level_budgets(9, 12, 1) == budget_schedule(9, 9, 1) == [9]  # k_min capped at T
    assert level_budgets(21, 6, 4, [3, 10, 21]) == [3, 10, 21]
    for bad in ([3, 10, 20], [1, 10, 21], [3, 3, 21]):
        with pytest.raises(ValueError, match=r"phase2.budgets=\[.*\]: expected strictly increasing budgets from >= 2 up to T=21"):
            level_budgets(21, 6, 4, bad, "phase2.budgets")


def test_level_budgets_error_names_the_section_keys_and_the_cap():
    from interpdiff.masks import level_budgets

    with pytest.raises(ValueError, match=r"phase2\.k_min=20, phase2\.n_levels=3: a clip of T=9 .*capped at T=9.*phase2\.budgets"):
        level_budgets(9, 20, 3, (), "phase2.budgets")
    with pytest.raises(ValueError, match=r"^levels\.k_min=5, levels\.n_levels=4: .*T=6"):
        level_budgets(6, 5, 4, (), "levels.budgets")
    assert level_budgets(21, 3, 4, (), "phase2.budgets") == [3, 6, 11, 21]
