r"""Drop-in use with TRL's ``GRPOTrainer``: prompt selection by an allocator, rewards recorded.

TRL (https://github.com/huggingface/trl, tested with 1.16) fixes ``num_generations`` per prompt,
so inside TRL an allocator can decide *which* prompts are sampled (:class:`Uniform`,
:class:`VADE`, :class:`VarianceAwareSampling`), not how many samples each gets; GVM and
Reinforce-Ada need a trainer of your own (:func:`gradnoise.rl.loop.collect_rollouts`). Three
pieces, none of which imports trl at module load:

* :class:`AllocatorSampler` - a ``torch.utils.data.Sampler`` that yields each chosen prompt index
  ``num_generations`` times, in TRL's ``RepeatSampler`` layout;
* :func:`recording_reward` - wraps a TRL reward function so every scored batch also calls
  ``allocator.update(prompt_ids, rewards)``;
* :func:`allocator_grpo_trainer` - a ``GRPOTrainer`` subclass whose train sampler is the above.

Advantages and aggregation map onto ``GRPOConfig`` where TRL has them
(:func:`trl_grpo_kwargs`): GRPO = ``scale_rewards="group"``, Dr. GRPO = ``"none"``, the
global-statistics baseline = ``"batch"``; sequence-mean = ``loss_type="grpo"``, token-mean =
``"dapo"``, constant = ``"dr_grpo"``. RLOO is TRL's ``RLOOTrainer``. OPO, BNPO, the SPO tracker and
Delta-L have no TRL switch; they need a custom loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.allocators import Allocator, RolloutStats

__all__ = ["AllocatorSampler", "allocator_grpo_trainer", "recording_reward", "trl_grpo_kwargs"]

_ADVANTAGE = {"grpo": "group", "dr_grpo": "none", "global": "batch"}
_AGGREGATION = {"sequence_mean": "grpo", "token_mean": "dapo", "constant": "dr_grpo"}


def trl_grpo_kwargs(*, advantage: str = "grpo", aggregation: str = "sequence_mean") -> dict:
    """``GRPOConfig`` keyword arguments for one of our advantage/aggregation names."""
    if advantage not in _ADVANTAGE or aggregation not in _AGGREGATION:
        raise GradNoiseError(
            explain(
                "trl_grpo_kwargs",
                expected=f"advantage in {sorted(_ADVANTAGE)} and aggregation in "
                f"{sorted(_AGGREGATION)} (what GRPOConfig can express)",
                got=f"advantage={advantage!r}, aggregation={aggregation!r}",
                fix="use trl.RLOOTrainer for RLOO, or a custom loss for OPO/BNPO/SPO/delta_l",
            )
        )
    return {"scale_rewards": _ADVANTAGE[advantage], "loss_type": _AGGREGATION[aggregation]}


class AllocatorSampler(Sampler[int]):
    """Per generation batch: draw ``candidates`` prompt indices, let the allocator pick
    ``prompts_per_batch`` of them, yield each ``num_generations`` times, the batch
    ``repeat_count`` times (TRL reuses a generation batch for ``steps_per_generation`` x
    ``num_iterations`` steps)."""

    def __init__(
        self,
        allocator: Allocator,
        num_prompts: int,
        *,
        num_generations: int,
        prompts_per_batch: int,
        candidates: int,
        num_batches: int,
        repeat_count: int = 1,
        seed: int,
    ) -> None:
        if not prompts_per_batch <= candidates <= num_prompts:
            raise GradNoiseError(
                explain(
                    "AllocatorSampler",
                    expected="prompts_per_batch <= candidates <= num_prompts",
                    got=f"{prompts_per_batch}, {candidates}, {num_prompts}",
                    fix="offer at least as many candidates as prompts per generation batch",
                )
            )
        self.allocator, self.num_prompts, self.g = allocator, num_prompts, num_generations
        self.p, self.c, self.batches, self.repeat = (
            prompts_per_batch,
            candidates,
            num_batches,
            repeat_count,
        )
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self) -> torch.Tensor:
        """One generation batch's prompt indices, as the allocator picks them."""
        cands = torch.randperm(self.num_prompts, generator=self.generator)[: self.c]
        stats = RolloutStats.fresh(cands, reward_range=self.allocator.reward_range)
        counts = self.allocator.allocate(stats, self.p * self.g)
        chosen = cands[counts > 0]
        if len(chosen) != self.p:
            raise GradNoiseError(
                explain(
                    "AllocatorSampler",
                    expected=f"an allocator that picks exactly {self.p} prompts",
                    got=f"{len(chosen)} prompts with counts {counts[counts > 0].tolist()}",
                    fix="use a selection allocator (Uniform, VADE, VarianceAwareSampling) with "
                    "prompts_per_step = generation_batch_size // num_generations",
                )
            )
        return chosen

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.batches):
            chosen = self.choose().tolist()
            for _ in range(self.repeat):
                yield from (i for i in chosen for _ in range(self.g))

    def __len__(self) -> int:
        return self.batches * self.p * self.g * self.repeat


def recording_reward(reward_fn: Callable, allocator: Allocator, *, id_column: str = "prompt_id"):
    """Wrap a TRL reward function; each call also feeds ``allocator.update(ids, rewards)``.

    The dataset needs an integer ``id_column`` (TRL passes dataset columns as keyword lists).
    Unscorable completions (``None``) are left out of the update.
    """

    def wrapped(prompts, completions, **kwargs):
        rewards = reward_fn(prompts, completions, **kwargs)
        pairs = [(i, r) for i, r in zip(kwargs[id_column], rewards, strict=True) if r is not None]
        if pairs:
            ids, values = zip(*pairs, strict=True)
            allocator.update(torch.tensor(ids), torch.tensor(values, dtype=torch.float64))
        return rewards

    wrapped.__name__ = getattr(reward_fn, "__name__", "reward")
    return wrapped


def allocator_grpo_trainer(allocator: Allocator, *, candidates: int, seed: int = 0):
    """A ``trl.GRPOTrainer`` subclass whose training prompts are chosen by ``allocator``.

    Pair it with :func:`recording_reward` so the allocator sees the rewards.
    """
    from trl import GRPOTrainer

    class AllocatorGRPOTrainer(GRPOTrainer):
        def _get_train_sampler(self, dataset=None) -> Sampler:
            dataset = self.train_dataset if dataset is None else dataset
            per_batch = self.args.generation_batch_size // self.num_generations
            return AllocatorSampler(
                allocator,
                len(dataset),
                num_generations=self.num_generations,
                prompts_per_batch=per_batch,
                candidates=candidates,
                num_batches=math.ceil(len(dataset) / per_batch),
                repeat_count=self.num_iterations * self.args.steps_per_generation,
                seed=seed,
            )

    return AllocatorGRPOTrainer
