r"""The default workload: a transformer LM on a synthetic language that never repeats.

The language is an order-2 Markov chain over ``vocab`` tokens, built from the seed:
:math:`P(x_t = c \mid x_{t-2} = a, x_{t-1} = b) = \mathrm{softmax}_c(s_1 U_{bc} + s_2 W_{abc})`
with standard normal :math:`U, W`. The bigram part :math:`U` is learned first and the trigram part
:math:`W` later, so the loss falls in stages and the gradient noise scale grows during training as
it does in real runs. Every batch is drawn fresh from the chain (an endless stream, nothing is
read twice), and the held-out batch is drawn from its own generator.

**Entropy floor.** With :math:`\pi` the stationary distribution of the pair :math:`(x_{t-1}, x_t)`,
the chain's entropy rate is :math:`H = \sum_{ab} \pi_{ab} H(P(\cdot \mid a, b))`. A window of
``T`` targets starts from the stationary pair, so its first target is predicted from one token
(:math:`H(X_1 \mid X_0)`) and the rest from two or more; the best achievable mean loss of a window
is ``loss_floor = (H(X_1|X_0) + (T - 1) H) / T`` nats, and the report shows the excess over it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gradnoise.workloads.base import Workload
from gradnoise.workloads.charlm import CharTransformer, lm_loss

__all__ = ["MarkovLanguage", "make"]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


@dataclass(frozen=True)
class MarkovLanguage:
    """An order-2 Markov chain over ``vocab`` tokens with its exact entropies (float64)."""

    transitions: torch.Tensor  # (V, V, V): P[a, b, c] = P(c | a, b)
    stationary: torch.Tensor  # (V, V): stationary distribution of consecutive pairs

    @classmethod
    def build(
        cls, vocab: int = 24, *, seed: int = 0, bigram: float = 2.0, trigram: float = 2.0
    ) -> MarkovLanguage:
        generator = torch.Generator().manual_seed(seed)
        u = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64)
        w = torch.randn(vocab, vocab, vocab, generator=generator, dtype=torch.float64)
        transitions = (bigram * u.unsqueeze(0) + trigram * w).softmax(-1)
        pairs = torch.full((vocab, vocab), 1.0 / vocab**2, dtype=torch.float64)
        for _ in range(1000):  # power iteration of the pair chain (a, b) -> (b, c)
            pairs = torch.einsum("ab,abc->bc", pairs, transitions)
        return cls(transitions, pairs / pairs.sum())

    @property
    def vocab(self) -> int:
        return self.transitions.shape[0]

    @property
    def entropy_rate(self) -> float:
        """:math:`H = \\sum_{ab} \\pi_{ab} H(P(\\cdot|a,b))` in nats per token."""
        return float((self.stationary * _entropy(self.transitions)).sum())

    @property
    def first_entropy(self) -> float:
        """:math:`H(X_1 \\mid X_0) = H(X_0, X_1) - H(X_0)` under the stationary pair."""
        joint = self.stationary.reshape(-1)
        return float(_entropy(joint) - _entropy(self.stationary.sum(1)))

    def loss_floor(self, context: int) -> float:
        """The lowest mean cross-entropy of a ``context``-target window (see the module)."""
        return (self.first_entropy + (context - 1) * self.entropy_rate) / context

    def sample(self, count: int, length: int, *, generator: torch.Generator) -> torch.Tensor:
        """``count`` sequences of ``length`` tokens, each starting from the stationary pair."""
        vocab = self.vocab
        start = torch.multinomial(
            self.stationary.reshape(-1), count, replacement=True, generator=generator
        )
        tokens = torch.empty(count, length, dtype=torch.long)
        tokens[:, 0], tokens[:, 1] = start // vocab, start % vocab
        cdf = self.transitions.cumsum(-1).reshape(vocab * vocab, vocab)
        for t in range(2, length):
            rows = cdf[tokens[:, t - 2] * vocab + tokens[:, t - 1]]
            u = torch.rand(count, 1, generator=generator, dtype=torch.float64)
            tokens[:, t] = torch.searchsorted(rows, u).squeeze(1).clamp_max(vocab - 1)
        return tokens


def stream(
    language: MarkovLanguage, batch_size: int, context: int, *, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless fresh ``(tokens, targets)`` batches, ``targets`` shifted by one token.

    Sequences are drawn ``BUFFERED_BATCHES`` batches at a time: sampling costs one vectorized
    op per position whatever the count, so this keeps the data's cost small against the step.
    """
    while True:
        chunk = language.sample(BUFFERED_BATCHES * batch_size, context + 1, generator=generator)
        for part in chunk.split(batch_size):
            yield part[:, :-1], part[:, 1:]


BUFFERED_BATCHES = 16


HELDOUT_EXAMPLES = 256


def make(*, batch_size: int = 32, seed: int = 0, context: int = 64, vocab: int = 24) -> Workload:
    """The Markov-language workload: a 2-block transformer (about 110k parameters)."""
    language = MarkovLanguage.build(vocab, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CharTransformer(vocab, context=context)
    heldout_generator = torch.Generator().manual_seed(10_000 + seed)
    heldout = language.sample(HELDOUT_EXAMPLES, context + 1, generator=heldout_generator)
    floor = language.loss_floor(context)
    train_generator = torch.Generator().manual_seed(seed)
    return Workload(
        name="markov",
        model=model,
        batches=stream(language, batch_size, context, generator=train_generator),
        loss=lm_loss,
        lr=3e-3,
        description=f"transformer LM on a synthetic order-2 Markov language ({vocab} tokens, "
        f"fresh data every batch, entropy floor {floor:.3f} nats)",
        heldout=(heldout[:, :-1], heldout[:, 1:]),
        loss_floor=floor,
    )
