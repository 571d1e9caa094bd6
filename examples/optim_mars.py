"""MARS-AdamW, VRGD and the noise-adaptive optimizer as drop-in torch optimizers on the char LM."""

import torch

from gradnoise.optim import MARS, VRGD, NoiseAdaptive
from gradnoise.stats import GradStats
from gradnoise.workloads import get_workload

for name in ("mars", "vrgd", "noise_adaptive"):
    work = get_workload("charlm", batch_size=4, seed=0)
    model = work.model
    if name == "mars":
        opt = MARS(model.parameters(), lr=3e-3)  # gamma=0.025, clip=1: the paper's defaults
    elif name == "vrgd":
        opt = VRGD(model.named_parameters(), lr=3e-3, gamma=0.1)
    else:
        opt = NoiseAdaptive(model.named_parameters(), lr=3e-3, base="adam")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(10):
        batch = next(work.batches)
        if name == "mars":
            loss = work.loss(model, batch)
            loss.backward()
            opt.step()
        else:  # the stats-fed optimizers read this batch's GradStats moments
            with GradStats(model, elementwise=True) as stats:
                loss = work.loss(model, batch)
                loss.backward()
            opt.step(moments=stats)
        opt.zero_grad()
        scheduler.step()
    print(f"{name}: loss after 10 steps {loss.item():.3f}")
