"""Rollout allocation in a loop: a tiny GRU policy learns arithmetic from exact-match rewards.

Usage: python examples/rl_allocation.py [rl_steps] [warm_start_steps]
"""

import sys

import torch

from gradnoise.rl import advantages as adv
from gradnoise.rl.adaptive import ReinforceAda
from gradnoise.rl.aggregation import aggregation_weights
from gradnoise.rl.bandits import VADE
from gradnoise.rl.composite import SelectThenSample
from gradnoise.rl.loop import collect_rollouts, zero_variance_mask
from gradnoise.workloads import arithmetic as ar

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
sft_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
g = torch.Generator().manual_seed(0)
torch.manual_seed(0)
pool = ar.make_problems(128, generator=g)
policy = ar.TinyGRUPolicy()
ar.supervised_warmup(policy, ar.make_problems(1024, generator=g), steps=sft_steps, generator=g)
opt = torch.optim.Adam(policy.parameters(), lr=2e-3)
# VADE picks 8 of the candidates per step (Thompson sampling); within each, Reinforce-Ada
# balanced sampling goes on in rounds of 4 until the group holds a success and a failure (<= 16)
allocator = SelectThenSample(
    VADE(len(pool), 8, seed=0),
    ReinforceAda(len(pool), 8, seed=0, balanced=True, target=2, round_size=4, max_samples=16),
)


def sample(ids):
    completions = policy.sample(pool.prompts[ids], generator=g)
    return ar.exact_match(completions, pool.targets[ids]), completions


print("greedy accuracy before RL:", round(ar.accuracy(policy, pool)[0], 3))
for step in range(steps):
    candidates = torch.randperm(len(pool), generator=g)[:32]
    ro = collect_rollouts(allocator, candidates, 64, sample)  # budget: 64 rollouts per step
    comps = torch.cat(ro.payload)[ro.order]
    mask = ar.completion_mask(comps)
    coef = aggregation_weights(mask.sum(1), "token_mean") * adv.grpo_advantages(
        ro.rewards, ro.sizes
    )
    logp = policy(pool.prompts[ro.prompt_ids], comps).log_softmax(-1)
    tok = logp.gather(-1, comps.unsqueeze(-1)).squeeze(-1) * mask
    loss = -(coef.float() * tok.sum(1)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        zero = zero_variance_mask(ro.rewards, ro.sizes).float().mean().item()
        print(f"step {step:3d} reward {ro.rewards.mean():.3f} zero-variance groups {zero:.2f}")
print("greedy accuracy after RL:", round(ar.accuracy(policy, pool)[0], 3))
