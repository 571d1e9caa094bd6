"""The CPU verifiable-reward task: problems, exact-match reward, policy shapes, warm start."""

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.workloads import arithmetic as ar


def decode(row):
    return "".join(ar.VOCAB[t] for t in row.tolist() if t < len(ar.VOCAB))


def test_problems_are_correct_and_graded():
    probs = ar.make_problems(40, generator=torch.Generator().manual_seed(0))
    assert probs.levels.tolist() == [1, 2, 3, 4] * 10
    for prompt, target, level in zip(probs.prompts, probs.targets, probs.levels, strict=True):
        question = decode(prompt)
        a, op, b = question[:-1].partition("+") if "+" in question else question[:-1].partition("-")
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert decode(target) == str(value) and (target == ar.EOS).sum() == 1
        assert level != 1 or (int(a) < 10 and int(b) < 10)


def test_exact_match_reward_and_sampling_shapes():
    probs = ar.make_problems(8, generator=torch.Generator().manual_seed(1))
    assert ar.exact_match(probs.targets, probs.targets).tolist() == [1.0] * 8
    wrong = probs.targets.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 10
    assert ar.exact_match(wrong, probs.targets)[0] == 0.0
    policy = ar.TinyGRUPolicy(hidden=16, embed=8)
    comp = policy.sample(probs.prompts, generator=torch.Generator().manual_seed(0))
    assert comp.shape == (8, ar.ANSWER_LEN)
    after_eos = torch.cumsum((comp == ar.EOS).long(), 1) - (comp == ar.EOS).long() > 0
    assert (comp[after_eos] == ar.PAD).all()
    assert policy(probs.prompts, comp).shape == (8, ar.ANSWER_LEN, len(ar.VOCAB) + 2)


def test_supervised_warmup_lowers_the_loss():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    probs = ar.make_problems(256, levels=(1,), generator=g)
    losses = ar.supervised_warmup(
        ar.TinyGRUPolicy(hidden=32, embed=16), probs, steps=60, generator=g
    )
    # the first loss is ~log(15) = 2.7 for an untrained head; 40 Adam steps must at least halve it
    assert losses[-1] < 0.5 * losses[0]


def test_bad_problem_requests_are_refused():
    with pytest.raises(GradNoiseError, match="levels from \\{1, 2, 3, 4\\}"):
        ar.make_problems(4, levels=(5,), generator=torch.Generator())
    with pytest.raises(GradNoiseError, match="n >= 1"):
        ar.make_problems(0, generator=torch.Generator())
