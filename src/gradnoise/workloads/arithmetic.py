r"""A verifiable-reward task that runs on a CPU: graded arithmetic and a tiny GRU policy.

Problems are strings such as ``"47+8="`` whose answer ``"55"`` is checked by exact match (reward
1 or 0). Difficulty is graded by ``level``:

===== ================================ =====
level problem                          answer
===== ================================ =====
1     ``a+b``,  a, b in 0..9           1-2 digits
2     ``a+b``,  a in 10..99, b in 0..9 2-3 digits
3     ``a+b``,  a, b in 10..99         2-3 digits
4     ``a-b``,  10 <= b <= a <= 99     1-2 digits
===== ================================ =====

The policy reads the left-padded prompt with a GRU and writes answer digits then ``<eos>``;
the GRU cell is written out with ``nn.Linear`` so ``torch.func`` can take per-rollout gradients.
A short supervised phase (:func:`supervised_warmup`) warm-starts it so pass rates spread over
(0, 1) across levels, the regime where rollout allocation matters. Depends only on torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain

__all__ = [
    "EOS",
    "PAD",
    "VOCAB",
    "ArithmeticProblems",
    "TinyGRUPolicy",
    "accuracy",
    "exact_match",
    "make_problems",
    "supervised_warmup",
]

VOCAB = "0123456789+-="
EOS, PAD = len(VOCAB), len(VOCAB) + 1
PROMPT_LEN, ANSWER_LEN = 6, 4  # "99+99=" and "198<eos>"


@dataclass(frozen=True)
class ArithmeticProblems:
    """``prompts`` (n, PROMPT_LEN) left-padded, ``targets`` (n, ANSWER_LEN) digits + EOS + PAD."""

    prompts: torch.Tensor
    targets: torch.Tensor
    levels: torch.Tensor

    def __len__(self) -> int:
        return len(self.levels)

    def subset(self, idx: torch.Tensor) -> ArithmeticProblems:
        return ArithmeticProblems(self.prompts[idx], self.targets[idx], self.levels[idx])


def _encode(text: str, width: int, *, left: bool) -> list[int]:
    ids = [VOCAB.index(c) for c in text]
    pad = [PAD] * (width - len(ids))
    return pad + ids if left else ids + pad


def _draw(level: int, g: torch.Generator) -> tuple[str, int]:
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    if level == 1:
        a, b = r(0, 9), r(0, 9)
    elif level == 2:
        a, b = r(10, 99), r(0, 9)
    elif level == 3:
        a, b = r(10, 99), r(10, 99)
    else:
        a = r(10, 99)
        b = r(10, a)
        return f"{a}-{b}=", a - b
    return f"{a}+{b}=", a + b


def make_problems(
    n: int, *, levels: tuple[int, ...] = (1, 2, 3, 4), generator: torch.Generator
) -> ArithmeticProblems:
    """``n`` problems, levels cycling through ``levels``, operands drawn from ``generator``."""
    if n < 1 or not levels or any(level not in (1, 2, 3, 4) for level in levels):
        raise GradNoiseError(
            explain(
                "make_problems",
                expected="n >= 1 and levels from {1, 2, 3, 4}",
                got=f"n={n}, levels={levels}",
                fix="ask for at least one problem of a known level",
            )
        )
    rows = [(levels[i % len(levels)], *_draw(levels[i % len(levels)], generator)) for i in range(n)]
    prompts = torch.tensor([_encode(q, PROMPT_LEN, left=True) for _, q, _ in rows])
    targets = torch.tensor([_encode(str(a), ANSWER_LEN - 1, left=False) for _, _, a in rows])
    eos_at = (targets != PAD).sum(1)
    targets = torch.cat([targets, torch.full((n, 1), PAD)], 1)
    targets[torch.arange(n), eos_at] = EOS
    return ArithmeticProblems(prompts, targets, torch.tensor([lv for lv, _, _ in rows]))


class TinyGRUPolicy(nn.Module):
    """Embedding -> GRU cell (explicit gates) -> linear head over ``VOCAB + <eos> + <pad>``."""

    def __init__(self, *, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB) + 2, embed)
        self.ih, self.hh = nn.Linear(embed, 3 * hidden), nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, len(VOCAB) + 2)
        self.hidden = hidden

    def step(self, token: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU update ``h' = (1 - z) n + z h`` (Cho et al. 2014 gates)."""
        xr, xz, xn = self.ih(self.embed(token)).chunk(3, -1)
        hr, hz, hn = self.hh(h).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return (1 - z) * torch.tanh(xn + r * hn) + z * h

    def encode(self, prompts: torch.Tensor) -> torch.Tensor:
        h = torch.zeros((*prompts.shape[:-1], self.hidden))
        for t in range(prompts.shape[-1] - 1):
            h = self.step(prompts[..., t], h)
        return h

    def forward(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(..., T, V)`` of ``completions`` given ``prompts``."""
        h, token, out = self.encode(prompts), prompts[..., -1], []
        for t in range(completions.shape[-1]):
            h = self.step(token, h)
            out.append(self.head(h))
            token = completions[..., t]
        return torch.stack(out, -2)

    @torch.no_grad()
    def sample(
        self,
        prompts: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> torch.Tensor:
        """Completions ``(B, ANSWER_LEN)``: tokens up to and including ``<eos>``, then PAD."""
        h, token, out = self.encode(prompts), prompts[:, -1], []
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(ANSWER_LEN):
            h = self.step(token, h)
            logits = self.head(h)[:, :PAD]
            token = (
                logits.argmax(-1)
                if greedy
                else torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
            )
            out.append(torch.where(done, torch.full_like(token, PAD), token))
            done = done | (token == EOS)
        return torch.stack(out, 1)


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """1 for generated tokens (including the first ``<eos>``), 0 for padding."""
    return (completions != PAD).float()


def exact_match(completions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reward 1.0 where the completion equals the target token for token, else 0.0."""
    return (completions == targets).all(1).float()


def supervised_warmup(
    policy: TinyGRUPolicy,
    problems: ArithmeticProblems,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    generator: torch.Generator,
) -> list[float]:
    """Teacher-forced cross-entropy on the answers; returns the loss curve."""
    opt, losses = torch.optim.Adam(policy.parameters(), lr=lr), []
    for _ in range(steps):
        idx = torch.randint(len(problems), (batch_size,), generator=generator)
        logits = policy(problems.prompts[idx], problems.targets[idx])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            problems.targets[idx].reshape(-1),
            ignore_index=PAD,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(policy: TinyGRUPolicy, problems: ArithmeticProblems) -> dict[int, float]:
    """Greedy exact-match accuracy per level, and overall under key 0."""
    correct = exact_match(policy.sample(problems.prompts, greedy=True), problems.targets)
    per_level = {
        int(lv): correct[problems.levels == lv].mean().item() for lv in problems.levels.unique()
    }
    return {0: correct.mean().item(), **per_level}
