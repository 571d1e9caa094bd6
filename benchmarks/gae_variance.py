"""Bias and variance of GAE(lambda) advantages and policy gradients on an MDP with a known value.

Per seed: a random 10-state chain MDP (actions left/right; the chosen direction with probability
0.7, stay 0.2, the other way 0.1, clipped at the ends), mean rewards R(s, a) ~ N(0, 1) observed
with N(0, 1) noise, every step ending the episode with probability 0.02 (then a uniform restart),
gamma = 0.97 and a fixed softmax policy with N(0, 1) logits. V solves
V = r_pi + gamma (1 - p_end) P_pi V exactly (linear algebra), Q(s, a) = R + gamma (1 - p_end)
P V and the true advantage is A = Q - V. Two critics: the exact V, and a wrong one,
V + sd(V) (0.2 + 0.5 z_s) with z_s ~ N(0, 1) fixed per state (a constant offset and a per-state
error).

Rollouts: ``batches`` x ``B`` environments, T = 128 steps each from a uniform start; GAE with
``bootstrap`` the critic at step T; only steps t < 64 are scored, so the truncation at T weighs
at most (gamma (1 - p_end))^64 = 0.09% on them. Per lambda in {0, 0.5, 0.9, 0.95, 1}:

* advantage bias: the RMS over visited (s, a) of E[A_hat - A | s, a] (visit-weighted), and
  advantage variance: the mean of Var[A_hat | s, a] (both over every scored step);
* policy gradient of the tabular softmax logits, g = mean_t A_hat_t grad log pi(a_t | s_t), one
  estimate per batch of B environments x 64 steps; reference g* = the same average with the
  true A over all batches. Reported relative to |g*|^2: bias |E g - g*| / |g*|, variance
  tr Cov(g) / |g*|^2 and MSE E|g - g*|^2 / |g*|^2; the "oracle" row uses the true A (its variance
  is the sampling variance no critic can remove). ``bias_se`` is the standard error of the bias
  from the finite number of batches.

    python benchmarks/gae_variance.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from gradnoise.rl import gae_advantages

S, A, T, SCORED = 10, 2, 128, 64
GAMMA, P_END, NOISE_SD = 0.97, 0.02, 1.0
LAMBDAS = (0.0, 0.5, 0.9, 0.95, 1.0)


def make_mdp(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    P = torch.zeros(S, A, S, dtype=torch.float64)
    for s in range(S):
        for a, step in ((0, -1), (1, 1)):
            for move, p in ((step, 0.7), (0, 0.2), (-step, 0.1)):
                P[s, a, min(max(s + move, 0), S - 1)] += p
    R = torch.randn(S, A, generator=g, dtype=torch.float64)
    logits = torch.randn(S, A, generator=g, dtype=torch.float64)
    pi = logits.softmax(-1)
    P_pi = torch.einsum("sa,sat->st", pi, P)
    r_pi = (pi * R).sum(-1)
    cont = GAMMA * (1 - P_END)
    V = torch.linalg.solve(torch.eye(S, dtype=torch.float64) - cont * P_pi, r_pi)
    Q = R + cont * torch.einsum("sat,t->sa", P, V)
    z = torch.randn(S, generator=g, dtype=torch.float64)
    wrong = V + V.std() * (0.2 + 0.5 * z)
    return {"P": P, "R": R, "pi": pi, "V": V, "Q": Q, "adv": Q - V[:, None], "wrong": wrong}


def rollout(mdp: dict, envs: int, seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    cum_pi = mdp["pi"].cumsum(-1)
    cum_P = mdp["P"].cumsum(-1)
    states = torch.empty(T + 1, envs, dtype=torch.long)
    actions = torch.empty(T, envs, dtype=torch.long)
    rewards = torch.empty(T, envs, dtype=torch.float64)
    dones = torch.empty(T, envs, dtype=torch.bool)
    s = torch.randint(0, S, (envs,), generator=g)
    for t in range(T):
        states[t] = s
        u = torch.rand(envs, 1, generator=g, dtype=torch.float64)
        a = (u > cum_pi[s]).sum(-1).clamp(max=A - 1)
        actions[t] = a
        rewards[t] = mdp["R"][s, a] + NOISE_SD * torch.randn(envs, generator=g, dtype=torch.float64)
        u = torch.rand(envs, 1, generator=g, dtype=torch.float64)
        nxt = (u > cum_P[s, a]).sum(-1).clamp(max=S - 1)
        done = torch.rand(envs, generator=g) < P_END
        dones[t] = done
        s = torch.where(done, torch.randint(0, S, (envs,), generator=g), nxt)
    states[T] = s
    return states, actions, rewards, dones


def policy_gradients(adv, s, a, pi, batch_of, batches):
    """Per-batch mean of adv * grad_logits log pi(a | s), flattened (batches, S * A)."""
    score = -pi[s]  # (n, A)
    score[torch.arange(len(a)), a] += 1.0
    contrib = adv.unsqueeze(1) * score
    index = (batch_of * S + s).unsqueeze(1) * A + torch.arange(A)
    out = torch.zeros(batches * S * A, dtype=torch.float64)
    out.index_add_(0, index.reshape(-1), contrib.reshape(-1))
    return out.reshape(batches, S * A) / (len(a) / batches)


def _rms(squares: torch.Tensor, counts: torch.Tensor) -> float:
    """Visit-weighted root mean of noise-corrected squared biases (0 when noise dominates)."""
    return max(0.0, ((counts * squares).sum() / counts.sum()).item()) ** 0.5


def measure(mdp: dict, batches: int, B: int, seed: int) -> dict:
    envs = batches * B
    states, actions, rewards, dones = rollout(mdp, envs, seed)
    s, a = states[:SCORED].reshape(-1), actions[:SCORED].reshape(-1)
    batch_of = (torch.arange(envs) // B).repeat(SCORED)
    true_adv = mdp["adv"][s, a]
    key = s * A + a
    counts = torch.bincount(key, minlength=S * A).to(torch.float64)
    g_true = policy_gradients(true_adv, s, a, mdp["pi"], batch_of, batches)
    g_ref = g_true.mean(0)
    ref_sq = g_ref.pow(2).sum().item()

    def pg_row(g):
        mean = g.mean(0)
        tr_cov = (g - mean).pow(2).sum(1).mean().item() * batches / (batches - 1)
        return {
            "pg_bias": (mean - g_ref).norm().item() / ref_sq**0.5,
            "pg_bias_se": (tr_cov / batches / ref_sq) ** 0.5,
            "pg_variance": tr_cov / ref_sq,
            "pg_mse": (g - g_ref).pow(2).sum(1).mean().item() / ref_sq,
        }

    rows = {
        "oracle": {"adv_bias": 0.0, "adv_action_bias": 0.0, "adv_variance": 0.0, **pg_row(g_true)}
    }
    for critic in ("exact", "wrong"):
        V_hat = mdp["V"] if critic == "exact" else mdp["wrong"]
        values = V_hat[states]  # (T + 1, envs): V_0..V_T
        for lam in LAMBDAS:
            adv = gae_advantages(rewards, values, dones, gamma=GAMMA, lam=lam).advantages
            est = adv[:SCORED].reshape(-1)
            err = est - true_adv
            cond_mean = torch.zeros(S * A, dtype=torch.float64).index_add_(0, key, err) / counts
            resid = (err - cond_mean[key]).pow(2)
            # sampling variance of each conditional mean, from the independent batches (steps of
            # one trajectory are correlated, so a per-step formula would understate it)
            cluster = torch.zeros(batches * S * A, dtype=torch.float64)
            cluster.index_add_(0, batch_of * S * A + key, err - cond_mean[key])
            w = cluster.reshape(batches, S * A) / counts  # (batches, S * A)
            bias = _rms(cond_mean.pow(2) - w.pow(2).sum(0), counts)
            # the part of the bias that varies with the action: a state-only error is a baseline
            # and does not bias the policy gradient
            pi = mdp["pi"]
            m = cond_mean.reshape(S, A)
            centred = m - (pi * m).sum(-1, keepdim=True)
            w = w.reshape(batches, S, A)
            centred_noise = (w - (pi * w).sum(-1, keepdim=True)).pow(2).sum(0)
            action_bias = _rms((centred.pow(2) - centred_noise).reshape(-1), counts)
            var = resid.mean().item()
            g = policy_gradients(est, s, a, mdp["pi"], batch_of, batches)
            rows[f"{critic} lam={lam:g}"] = {
                "critic": critic,
                "lam": lam,
                "adv_bias": bias,
                "adv_action_bias": action_bias,
                "adv_variance": var,
                **pg_row(g),
            }
    scale = true_adv.pow(2).mean().sqrt().item()
    return {"true_adv_rms": scale, "rows": rows}


def summarize(per_seed: list[dict]) -> dict:
    out = {}
    for name in per_seed[0]["rows"]:
        out[name] = {}
        for metric in (
            "adv_bias",
            "adv_action_bias",
            "adv_variance",
            "pg_bias",
            "pg_bias_se",
            "pg_variance",
            "pg_mse",
        ):
            vals = [seed["rows"][name][metric] for seed in per_seed]
            out[name][metric] = {
                "median": statistics.median(vals),
                "min": min(vals),
                "max": max(vals),
            }
    return out


def verdict(per_seed: list[dict], summary: dict) -> list[str]:
    wrong = [f"wrong lam={lam:g}" for lam in LAMBDAS]
    exact = [f"exact lam={lam:g}" for lam in LAMBDAS]
    n = len(per_seed)

    def monotone(names, metric, sign):
        """How many seeds have ``metric`` monotone (sign +1: rising) along ``names``."""
        return sum(
            all(
                sign * (seed["rows"][b][metric] - seed["rows"][a][metric]) >= 0
                for a, b in itertools.pairwise(names)
            )
            for seed in per_seed
        )

    def ends(names, metric):
        """Per-seed ratios metric(lam=1) / metric(lam=0)."""
        return ", ".join(
            f"{seed['rows'][names[-1]][metric] / max(seed['rows'][names[0]][metric], 1e-300):.3g}"
            for seed in per_seed
        )

    m = lambda name, metric: summary[name][metric]["median"]  # noqa: E731
    exact_unbiased = sum(
        all(seed["rows"][k]["pg_bias"] <= 3 * seed["rows"][k]["pg_bias_se"] for k in exact)
        for seed in per_seed
    )
    best = {
        critic: min(LAMBDAS, key=lambda lam: m(f"{critic} lam={lam:g}", "pg_mse"))
        for critic in ("exact", "wrong")
    }
    return [
        "variance: advantage variance rises monotonically with lambda on "
        f"{monotone(exact, 'adv_variance', 1)}/{n} seeds (exact critic), "
        f"{monotone(wrong, 'adv_variance', 1)}/{n} (wrong critic); lam=1 / lam=0 per seed (wrong "
        f"critic): {ends(wrong, 'adv_variance')}; policy-gradient variance lam=1 / lam=0: "
        f"{ends(wrong, 'pg_variance')} (monotone on {monotone(wrong, 'pg_variance', 1)}/{n})",
        f"bias: with the wrong critic the action-dependent advantage bias falls monotonically with "
        f"lambda on {monotone(wrong, 'adv_action_bias', -1)}/{n} seeds (median "
        f"{m(wrong[0], 'adv_action_bias'):.3g} at lam=0, "
        f"{m(wrong[-1], 'adv_action_bias'):.3g} at lam=1), "
        f"the policy-gradient bias on {monotone(wrong, 'pg_bias', -1)}/{n} (median "
        f"{m(wrong[0], 'pg_bias'):.3g} -> {m(wrong[-1], 'pg_bias'):.3g} of |g*|)",
        f"exact critic: every lambda's policy gradient within 3 standard errors of unbiased on "
        f"{exact_unbiased}/{n} seeds",
        f"trade-off: lambda of least policy-gradient MSE (median over seeds) is {best['exact']:g} "
        f"with the exact critic and {best['wrong']:g} with the wrong one",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 100 batches of 16 envs")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, batches, B = (range(3), 100, 16) if args.quick else (range(16), 400, 16)
    start = time.perf_counter()
    per_seed = []
    for seed in seeds:
        result = measure(make_mdp(seed), batches, B, seed)
        per_seed.append({"seed": seed, **result})
        print(f"seed {seed}: true advantage RMS {result['true_adv_rms']:.3f}", flush=True)
    summary = summarize(per_seed)
    heads = ("adv bias", "act bias", "adv var", "pg bias", "pg var", "pg mse")
    print(f"{'row':>16} " + " ".join(f"{h:>9}" for h in heads))
    for name, row in summary.items():
        print(f"{name:>16} " + " ".join(
            f"{row[k]['median']:{w}.4f}"
            for k, w in (("adv_bias", 9), ("adv_action_bias", 9), ("adv_variance", 9),
                         ("pg_bias", 9), ("pg_variance", 9), ("pg_mse", 9))
        ))  # fmt: skip
    lines = verdict(per_seed, summary)
    for line in lines:
        print("verdict:", line)
    results = {
        "config": {
            "states": S,
            "actions": A,
            "T": T,
            "scored_steps": SCORED,
            "gamma": GAMMA,
            "p_end": P_END,
            "reward_noise_sd": NOISE_SD,
            "lambdas": list(LAMBDAS),
            "seeds": list(seeds),
            "batches": batches,
            "envs_per_batch": B,
        },
        "per_seed": per_seed,
        "summary": summary,
        "verdict": lines,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gae_variance_quick" if args.quick else "gae_variance"  # --quick never overwrites
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(f"{time.perf_counter() - start:.1f} s -> {out / (stem + '.json')}")


if __name__ == "__main__":
    main()
