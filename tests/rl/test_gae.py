"""GAE(lambda) against hand computations, the Monte-Carlo return (lam = 1), the TD error (lam = 0),
episode boundaries, and every error message."""

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl import GAE, gae_advantages


def loop_gae(rewards, values, dones, gamma, lam):
    """Plain-Python GAE of one environment: values has T + 1 entries."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        alive = 0.0 if dones[t] else 1.0
        delta = rewards[t] + gamma * values[t + 1] * alive - values[t]
        running = delta + gamma * lam * alive * running
        adv[t] = running
    return adv


def test_hand_computation_three_steps():
    # gamma = 0.5, lam = 0.5, r = (1, 2, 3), V = (0.5, 1, 1.5), bootstrap V_3 = 2
    # delta_2 = 3 + 0.5 * 2 - 1.5 = 2.5;  delta_1 = 2 + 0.5 * 1.5 - 1 = 1.75
    # delta_0 = 1 + 0.5 * 1 - 0.5 = 1
    # A_2 = 2.5;  A_1 = 1.75 + 0.25 * 2.5 = 2.375;  A_0 = 1 + 0.25 * 2.375 = 1.59375
    out = gae_advantages(
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([0.5, 1.0, 1.5]),
        torch.tensor([False, False, False]),
        gamma=0.5,
        lam=0.5,
        bootstrap=torch.tensor(2.0),
    )
    assert isinstance(out, GAE)
    torch.testing.assert_close(out.advantages, torch.tensor([1.59375, 2.375, 2.5]))
    torch.testing.assert_close(out.returns, torch.tensor([2.09375, 3.375, 4.0]))


def test_matches_plain_loop_on_a_random_batch_and_both_value_layouts():
    g = torch.Generator().manual_seed(0)
    T, B = 12, 5
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T + 1, B, generator=g, dtype=torch.float64)
    d = torch.rand(T, B, generator=g) < 0.2
    a, ret = gae_advantages(r, v, d, gamma=0.9, lam=0.8)
    b, ret_b = gae_advantages(r, v[:-1], d.to(torch.int64), gamma=0.9, lam=0.8, bootstrap=v[-1])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ret, ret_b)
    torch.testing.assert_close(ret, a + v[:-1])
    for col in range(B):
        ref = loop_gae(r[:, col].tolist(), v[:, col].tolist(), d[:, col].tolist(), 0.9, 0.8)
        torch.testing.assert_close(a[:, col], torch.tensor(ref, dtype=torch.float64))
    assert a.dtype == torch.float64


def test_lam_one_is_discounted_return_minus_value():
    g = torch.Generator().manual_seed(1)
    T, B, gamma = 10, 3, 0.95
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    boot = torch.randn(B, generator=g, dtype=torch.float64)
    d = torch.zeros(T, B, dtype=torch.bool)
    d[4, 1] = True  # column 1: an episode ends after step 4
    adv, ret = gae_advantages(r, v, d, gamma=gamma, lam=1.0, bootstrap=boot)
    mc = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            total, k = 0.0, t
            while True:
                total += gamma ** (k - t) * r[k, b].item()
                if d[k, b]:
                    break
                if k == T - 1:
                    total += gamma ** (T - t) * boot[b].item()
                    break
                k += 1
            mc[t, b] = total
    torch.testing.assert_close(ret, mc)
    torch.testing.assert_close(adv, mc - v)


def test_lam_zero_is_one_step_td_error():
    g = torch.Generator().manual_seed(2)
    T, B, gamma = 7, 4, 0.9
    r = torch.randn(T, B, generator=g)
    v = torch.randn(T + 1, B, generator=g)
    d = torch.rand(T, B, generator=g) < 0.3
    adv, ret = gae_advantages(r, v, d, gamma=gamma, lam=0.0)
    td = r + gamma * v[1:] * (~d) - v[:-1]
    torch.testing.assert_close(adv, td)
    torch.testing.assert_close(ret, r + gamma * v[1:] * (~d))
    assert adv.dtype == torch.float32


def test_episode_boundary_cuts_the_recursion():
    # two episodes in one column: steps 0-2 and 3-5; changing anything after the boundary
    # (rewards, values, bootstrap) leaves the first episode's advantages unchanged
    r = torch.tensor([[1.0], [0.0], [2.0], [5.0], [-1.0], [3.0]])
    v = torch.tensor([[0.2], [0.4], [0.1], [1.0], [2.0], [0.5]])
    d = torch.tensor([[0], [0], [1], [0], [0], [0]])
    a1 = gae_advantages(r, v, d, gamma=0.9, lam=0.95, bootstrap=torch.tensor([1.0])).advantages
    r2, v2 = r.clone(), v.clone()
    r2[3:] += 100.0
    v2[3:] -= 7.0
    a2 = gae_advantages(r2, v2, d, gamma=0.9, lam=0.95, bootstrap=torch.tensor([-50.0])).advantages
    torch.testing.assert_close(a1[:3], a2[:3])
    assert not torch.allclose(a1[3:], a2[3:])
    # the last step of the first episode is r - V alone (no bootstrap across the boundary)
    torch.testing.assert_close(a1[2, 0], torch.tensor(2.0 - 0.1))
    # a terminal last step ignores the bootstrap entirely
    dt = torch.tensor([[0], [0], [1], [0], [0], [1]])
    x = gae_advantages(r, v, dt, gamma=0.9, lam=0.95, bootstrap=torch.tensor([1.0])).advantages
    y = gae_advantages(r, v, dt, gamma=0.9, lam=0.95, bootstrap=torch.tensor([9.0])).advantages
    torch.testing.assert_close(x, y)


def test_integer_rewards_and_lists_come_back_in_default_dtype():
    out = gae_advantages([[1], [0]], [[0.0], [0.0], [0.0]], [[0], [1]], gamma=1.0, lam=1.0)
    assert out.advantages.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out.advantages, torch.tensor([[1.0], [0.0]]))


R, V, D = torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(3, 2, dtype=torch.bool)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.5}, r"gae_advantages\(gamma\): expected a finite real number in \[0, 1\]"),
        ({"gamma": -0.1}, r"gae_advantages\(gamma\): expected a finite real number in \[0, 1\]"),
        ({"gamma": float("nan")}, r"gae_advantages\(gamma\): expected a finite real"),
        ({"gamma": True}, r"gae_advantages\(gamma\): expected a finite real"),
        ({"lam": 1.01}, r"gae_advantages\(lam\): expected a finite real number in \[0, 1\]"),
        ({"lam": "0.9"}, r"gae_advantages\(lam\): expected a finite real"),
        ({"rewards": torch.zeros(3, 2, 1)}, r"gae_advantages\(rewards\): expected a \(T, B\)"),
        ({"rewards": torch.zeros(0, 2)}, r"gae_advantages\(rewards\): expected a \(T, B\)"),
        ({"rewards": torch.tensor(1.0)}, r"gae_advantages\(rewards\): expected a \(T, B\)"),
        ({"rewards": "abc"}, r"gae_advantages\(rewards\): expected rewards as a real tensor"),
        (
            {"rewards": torch.zeros(3, 2, dtype=torch.complex64)},
            r"gae_advantages\(rewards\): expected rewards as a real tensor.*complex64",
        ),
        (
            {"rewards": torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, 0.0]])},
            r"gae_advantages\(rewards\): expected finite rewards, got NaN .* positions \[2\]",
        ),
        (
            {"values": torch.zeros(3, 2)},
            r"gae_advantages\(values\): expected shape \(4, 2\) .*bootstrap is None.*"
            r"Pass bootstrap=",
        ),
        (
            {"values": torch.zeros(5, 2)},
            r"gae_advantages\(values\): expected shape \(4, 2\).*got shape \(5, 2\)",
        ),
        (
            {"values": torch.zeros(4, 2), "bootstrap": torch.zeros(2)},
            r"gae_advantages\(values\): expected shape \(3, 2\) .*when bootstrap is given",
        ),
        (
            {"values": torch.zeros(3, 2), "bootstrap": torch.zeros(3)},
            r"gae_advantages\(bootstrap\): expected shape \(2,\)",
        ),
        (
            {"values": torch.zeros(3, 2), "bootstrap": object()},
            r"gae_advantages\(bootstrap\): expected bootstrap as a real tensor",
        ),
        (
            {"values": torch.full((4, 2), float("inf"))},
            r"gae_advantages\(values\): expected finite values",
        ),
        (
            {"values": torch.zeros(3, 2), "bootstrap": torch.tensor([0.0, float("nan")])},
            r"gae_advantages\(values/bootstrap\): expected finite values/bootstrap",
        ),
        ({"dones": torch.zeros(2, 3)}, r"gae_advantages\(dones\): expected shape \(3, 2\)"),
        (
            {"dones": torch.tensor([[0, 2], [0, 0], [0.5, 1]])},
            r"gae_advantages\(dones\): expected booleans or 0/1 values, got values \[2\.0, 0\.5\]",
        ),
        (
            {"dones": torch.full((3, 2), float("nan"))},
            r"gae_advantages\(dones\): expected booleans or 0/1 values",
        ),
        (
            {"rewards": torch.full((3, 2), 3e38), "values": torch.full((4, 2), -3e38)},
            r"gae_advantages: expected advantages that fit in torch.float32.*float64",
        ),
    ],
)
def test_every_error_message(kwargs, match):
    args = {"rewards": R, "values": V, "dones": D, "gamma": 0.9, "lam": 0.95, "bootstrap": None}
    args.update(kwargs)
    with pytest.raises(GradNoiseError, match=match):
        gae_advantages(
            args["rewards"],
            args["values"],
            args["dones"],
            gamma=args["gamma"],
            lam=args["lam"],
            bootstrap=args["bootstrap"],
        )


def test_one_environment_layout_checks_scalar_bootstrap():
    with pytest.raises(GradNoiseError, match=r"gae_advantages\(bootstrap\): expected shape \(\)"):
        gae_advantages(
            torch.zeros(3), torch.zeros(3), torch.zeros(3), gamma=1, lam=1, bootstrap=torch.zeros(2)
        )
    with pytest.raises(GradNoiseError, match=r"gae_advantages\(values\): expected shape \(4,\)"):
        gae_advantages(torch.zeros(3), torch.zeros(5), torch.zeros(3), gamma=1, lam=1)
