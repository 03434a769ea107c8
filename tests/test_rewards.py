"""Reward functions and ExGRPO's dialogue-structure bonus."""
import math

import pytest
import torch

from pydistill.rewards import AccuracyReward, combine_rewards, dialogue_structure_bonus, format_reward


def test_dsu_bonus_on_constructed_rewards():
    full = torch.tensor([[1., 1., 0., 1.], [1., 0., 0., 0.], [0., 0., 0., 0.], [1., 1., 1., 1.]])
    partial = torch.tensor([[1., 0., 0.], [1., 1., 0.], [0., 0., 0.], [1., 1., 1.]])
    # P_full = .75, .25, 0, 1 ; P_partial = 1/3, 2/3, 0, 1 ; nu = 1.1
    bonus = dialogue_structure_bonus(full, partial, delta=0.5, nu=1.1)
    expected = torch.tensor([[.5, .5, 0., .5], [0., 0., 0., 0.], [0., 0., 0., 0.], [0., 0., 0., 0.]])
    assert torch.equal(bonus, expected)
    # nu = 0.9: the last question now qualifies (1 > 0.9), the third still has no successes to reward
    assert dialogue_structure_bonus(full, partial, delta=0.5, nu=0.9)[3].tolist() == [.5] * 4
    assert dialogue_structure_bonus(full, partial, delta=0.0, nu=0.0).abs().sum() == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(full_rewards=torch.zeros(2, 3), partial_rewards=torch.zeros(3, 3), delta=0.1, nu=1.0), "must share Q"),
    (dict(full_rewards=torch.zeros(6), partial_rewards=torch.zeros(2, 3), delta=0.1, nu=1.0), r"\[Q, G\]"),
    (dict(full_rewards=torch.zeros(2, 3), partial_rewards=torch.zeros(2, 3), delta=-1.0, nu=1.0), "delta"),
    (dict(full_rewards=torch.zeros(2, 3), partial_rewards=torch.zeros(2, 3), delta=0.1, nu=math.nan), "nu"),
])
def test_dsu_bonus_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dialogue_structure_bonus(**kwargs)


def test_combined_rewards_weights_and_nan():
    class Task:
        def is_correct(self, problem, completion):
            return problem == completion.split()[-1].strip("\\boxed{}")

    def unscorable(problems, completions):
        return [math.nan if "?" in c else 0.0 for c in completions]

    fn, names = combine_rewards([AccuracyReward(Task()), format_reward, unscorable], [1.0, 0.5, 1.0])
    totals, columns = fn(["7", "7", "8"], ["so \\boxed{7}", "it is 7 \\boxed{7} \\boxed{7}", "? 9"])
    assert names == ["accuracy", "format", "unscorable"]
    assert totals[:2] == [1.5, 1.0] and math.isnan(totals[2])
    assert columns[1] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one entry per function"):
        combine_rewards([format_reward], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards([])
    bad, _ = combine_rewards([lambda p, c: [1.0]])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        bad(["a", "b"], ["x", "y"])
