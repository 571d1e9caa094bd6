"""Advantages over ragged groups, and which loss aggregation has the lowest gradient variance."""

import torch

from gradnoise.rl import advantages as adv
from gradnoise.rl.aggregation import aggregation_variance

# three prompts with 4, 2 and 3 sampled responses (ragged), binary verifiable rewards
rewards, sizes = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]), [4, 2, 3]
lengths = torch.tensor([12.0, 30.0, 8.0, 20.0, 5.0, 6.0, 40.0, 10.0, 9.0])
for name, a in {
    "grpo": adv.grpo_advantages(rewards, sizes),
    "dr_grpo": adv.dr_grpo_advantages(rewards, sizes),
    "rloo": adv.rloo_advantages(rewards, sizes),
    "opo": adv.opo_advantages(rewards, lengths, sizes),
    "bnpo": adv.bnpo_advantages(rewards, sizes),
}.items():
    print(f"{name:8s}", [round(x, 3) for x in a.tolist()])

# response gradients whose variance grows with length (Var g_i ~ L_i), as in He et al. 2025
g = torch.Generator().manual_seed(0)
lengths = torch.randint(1, 41, (2000,), generator=g)
grads = 1.0 + lengths.float().sqrt()[:, None] * torch.randn(2000, 16, generator=g)
for method, v in aggregation_variance(grads, lengths, batch_size=32, generator=g).items():
    print(f"{method:14s} tr Cov / ||mean||^2 = {v.relative:.3f}")
