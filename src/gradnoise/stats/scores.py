r"""Per-example scores keyed by sample id, streamed over training, in a compact store.

Three scores per example ``i`` (``N`` examples, a few floats each):

* ``grad_norm``: the mean over visits of :math:`\|g_i\|` (GraNd, Paul et al. 2021, "Deep
  Learning on a Data Diet"), e.g. from ``GradStats.total_sq_norms()``;
* ``loss``: the mean over visits of the per-example loss;
* ``vog``: Variance of Gradients (Agarwal, D'souza & Hooker 2022, "Estimating Example
  Difficulty using Variance of Gradients"): with :math:`S_{i,t}` a per-example gradient vector of
  dimension :math:`D` at checkpoint :math:`t = 1..K` (the paper uses the input gradient of the
  true-class logit, :func:`class_logit_input_grads`),

  .. math::
      \mathrm{VoG}_i = \frac1D \sum_{p=1}^{D} \frac1K \sum_t (S_{i,t,p} - \bar S_{i,p})^2,

  kept with Welford's update over checkpoints. With ``sketch_dim=k`` the vectors are first
  projected by a fixed Gaussian :math:`R \in \mathbb R^{D\times k}` with
  :math:`E[R R^T] = I`, so the store holds ``k`` floats per example and the estimate stays
  unbiased (relative sd about :math:`\sqrt{2/k}`).

Scores are NaN for examples not seen yet (``vog``: fewer than 2 checkpoints) and are left out of
:meth:`ExampleScores.top_k`.
"""

from __future__ import annotations

import torch
from torch import nn

from gradnoise.errors import require

__all__ = ["ExampleScores", "class_logit_input_grads"]

SCORES = ("grad_norm", "loss", "vog")


class ExampleScores:
    """A store of per-example scores that a data-selection step can query.

    Example::

        scores = ExampleScores(len(dataset), sketch_dim=64, seed=0)
        with GradStats(model) as stats:
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
        scores.update(ids, grad_sq_norms=stats.total_sq_norms(), losses=losses)
        ...                                              # at each checkpoint:
        scores.update_vog(ids, class_logit_input_grads(model, x, y))
        hardest, values = scores.top_k("vog", 100)

    ``update`` checks the ids with one host sync (``check_ids=False`` skips it).
    """

    def __init__(
        self, num_examples: int, *, sketch_dim: int | None = None, seed: int = 0, device=None
    ) -> None:
        require(
            isinstance(num_examples, int) and num_examples > 0,
            "ExampleScores(num_examples=...)",
            "a positive int",
            repr(num_examples),
            "pass len(dataset)",
        )
        ok = sketch_dim is None or (isinstance(sketch_dim, int) and sketch_dim > 0)
        require(
            ok,
            "ExampleScores(sketch_dim=...)",
            "None or a positive int",
            repr(sketch_dim),
            "e.g. 64",
        )
        self.num_examples, self.sketch_dim, self.seed = num_examples, sketch_dim, seed
        zeros = lambda: torch.zeros(num_examples, dtype=torch.float64, device=device)  # noqa: E731
        self._sums = {name: zeros() for name in ("grad_norm", "loss")}
        self._counts = {name: zeros() for name in ("grad_norm", "loss", "vog")}
        self._vog_m2 = zeros()
        self._vog_mean: torch.Tensor | None = None  # (N, k) running mean of the (sketched) vectors
        self._projection: torch.Tensor | None = None
        self._dim: int | None = None

    def update(
        self,
        ids: torch.Tensor,
        *,
        grad_sq_norms: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        check_ids: bool = True,
    ) -> None:
        """Add one visit of examples ``ids``: squared gradient norms and/or losses, shape (B,)."""
        for name, values in (("grad_sq_norms", grad_sq_norms), ("losses", losses)):
            if values is not None:
                _check_batch(name, ids, values)
        if check_ids:
            self._check_ids(ids, unique=False)
        if grad_sq_norms is not None:
            self._add("grad_norm", ids, grad_sq_norms.detach().clamp_min(0).sqrt())
        if losses is not None:
            self._add("loss", ids, losses.detach())

    def _add(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        self._sums[name].index_add_(0, ids, values.to(self._sums[name]))
        self._counts[name].index_add_(0, ids, torch.ones_like(self._sums[name][: len(ids)]))

    def update_vog(self, ids: torch.Tensor, grads: torch.Tensor, *, check_ids: bool = True) -> None:
        """Add one checkpoint's per-example gradient vectors ``grads`` (B, ...) of ``ids``."""
        _check_batch("grads", ids, grads)
        flat = grads.detach().reshape(len(ids), -1).to(torch.float64)
        require(
            self._dim is None or flat.shape[1] == self._dim,
            "ExampleScores.update_vog",
            f"vectors of dimension {self._dim} (as at the first checkpoint)",
            f"dimension {flat.shape[1]}",
            "pass the same gradient (e.g. the input gradient) at every checkpoint",
        )
        if check_ids:
            self._check_ids(ids, unique=True)
        if self._dim is None:
            self._start_vog(flat.shape[1], flat.device)
        sketch = flat if self._projection is None else flat @ self._projection
        count = self._counts["vog"][ids] + 1
        delta = sketch - self._vog_mean[ids]
        mean = self._vog_mean[ids] + delta / count.unsqueeze(1)
        self._vog_m2.index_add_(0, ids, (delta * (sketch - mean)).sum(1))
        self._vog_mean[ids] = mean
        self._counts["vog"][ids] = count

    def _start_vog(self, dim: int, device: torch.device) -> None:
        self._dim = dim
        width = dim if self.sketch_dim is None else self.sketch_dim
        self._vog_mean = torch.zeros(self.num_examples, width, dtype=torch.float64, device=device)
        if self.sketch_dim is not None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            gauss = torch.randn(dim, self.sketch_dim, generator=gen, dtype=torch.float64)
            self._projection = (gauss / self.sketch_dim**0.5).to(device)

    def values(self, score: str) -> torch.Tensor:
        """The ``(N,)`` tensor of one score (NaN where undefined)."""
        require(
            score in SCORES, "ExampleScores score", f"one of {SCORES}", repr(score), "e.g. 'vog'"
        )
        if score == "vog":
            count = self._counts["vog"]
            vog = self._vog_m2 / count / (self._dim or 1)
            return torch.where(count >= 2, vog, torch.full_like(vog, float("nan")))
        count = self._counts[score]
        return torch.where(
            count > 0, self._sums[score] / count, torch.full_like(count, float("nan"))
        )

    def top_k(
        self, score: str, k: int, *, largest: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids and values of the ``k`` highest (or lowest) defined scores."""
        require(
            isinstance(k, int) and k > 0,
            "ExampleScores.top_k(k=...)",
            "a positive int",
            repr(k),
            "e.g. k=100",
        )
        values = self.values(score)
        defined = (~values.isnan()).nonzero().squeeze(1)
        picked = values[defined].topk(min(k, len(defined)), largest=largest)
        return defined[picked.indices], picked.values

    def _check_ids(self, ids: torch.Tensor, *, unique: bool) -> None:
        integer = ids.dtype in (torch.int32, torch.int64)
        if not integer or (len(ids) and bool((ids.min() < 0) | (ids.max() >= self.num_examples))):
            got = f"dtype {ids.dtype}" if not integer else f"ids in [{ids.min()}, {ids.max()}]"
            require(
                False,
                "ExampleScores ids",
                f"integer ids in [0, {self.num_examples})",
                got,
                "pass each example's index in the dataset (e.g. return it from __getitem__)",
            )
        duplicated = unique and len(torch.unique(ids)) != len(ids)
        require(
            not duplicated,
            "ExampleScores.update_vog ids",
            "distinct ids within one call",
            "repeated ids",
            "give each example's gradient once per checkpoint",
        )

    def state_dict(self) -> dict:
        """Tensors and settings, for checkpoints."""
        return {
            "sums": self._sums,
            "counts": self._counts,
            "vog_m2": self._vog_m2,
            "vog_mean": self._vog_mean,
            "projection": self._projection,
            "dim": self._dim,
        }

    def load_state_dict(self, state: dict) -> None:
        self._sums, self._counts, self._vog_m2 = state["sums"], state["counts"], state["vog_m2"]
        self._vog_mean, self._projection, self._dim = (
            state["vog_mean"],
            state["projection"],
            state["dim"],
        )


def class_logit_input_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:math:`\\partial z_{y_i}(x_i) / \\partial x_i` per example, the gradient VoG uses.

    One backward of the summed true-class logits; exact per example for models without
    batch-coupled layers (eval-mode BatchNorm is fine). Does not touch parameter ``.grad``.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    selected = logits.gather(1, y.reshape(-1, 1)).sum()
    return torch.autograd.grad(selected, x)[0]


def _check_batch(name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
    require(
        ids.dim() == 1 and values.shape[:1] == ids.shape,
        f"ExampleScores {name}",
        f"a leading dimension equal to the number of ids ({tuple(ids.shape)})",
        str(tuple(values.shape)),
        "pass one value (or vector) per example id, in the same order",
    )
