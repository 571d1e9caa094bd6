"""Per-example scores keyed by sample id: gradient norm, loss and VoG, then the hardest examples."""

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise import GradStats
from gradnoise.stats.scores import ExampleScores, class_logit_input_grads

torch.manual_seed(0)
x_all = torch.randn(512, 8)
y_all = (x_all[:, 0] > 0).long()
y_all[:16] = 1 - y_all[:16]  # 16 mislabeled examples: ids 0..15
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scores = ExampleScores(len(x_all))  # sketch_dim=k keeps k floats per example for big inputs

for _epoch in range(6):
    for ids in torch.randperm(len(x_all)).split(64):
        with GradStats(model) as stats:
            losses = F.cross_entropy(model(x_all[ids]), y_all[ids], reduction="none")
            losses.mean().backward()
        scores.update(ids, grad_sq_norms=stats.total_sq_norms(), losses=losses)
        optimizer.step()
        optimizer.zero_grad()
    everyone = torch.arange(len(x_all))  # a checkpoint: one VoG snapshot per epoch
    scores.update_vog(everyone, class_logit_input_grads(model, x_all, y_all))

for score in ("loss", "grad_norm", "vog"):
    ids, _ = scores.top_k(score, 16)
    mislabeled = int((ids < 16).sum())
    print(f"top-16 by {score}: {mislabeled} of the 16 mislabeled examples")
