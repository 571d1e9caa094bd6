"""Monitor in your own training loop: measure the gradient noise one step in ten, get a report.

python examples/profile_loop.py [OUT_DIR]
"""

import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.monitor import Monitor

torch.manual_seed(0)
teacher = torch.randn(20, 3)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradnoise-loop-")

with Monitor(model, out=out, every=10) as monitor:
    for _ in range(200):
        x = torch.randn(32, 20)
        y = (x @ teacher + 0.5 * torch.randn(32, 3)).argmax(1)  # noisy labels
        with monitor.step() as step:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step.loss = loss
        optimizer.step()
        optimizer.zero_grad()

last = monitor.records[-1]
print(f"B_simple ~ {last['b_simple']:.1f} at batch size {last['batch_size']}")
print(f"report: {out}/report.html")
