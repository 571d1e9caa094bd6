"""Variance-aware RL post-training: advantages, loss aggregation and rollout allocation.

* :mod:`~gradnoise.rl.advantages` - GRPO, Dr. GRPO, RLOO, OPO, BNPO, global-statistics and
  tracker baselines as pure functions over a dense or ragged (prompts x samples) layout;
* :mod:`~gradnoise.rl.gae` - GAE(lambda) advantages and returns over (time x batch) rollouts;
* :mod:`~gradnoise.rl.aggregation` - token-mean, sequence-mean, constant (Dr. GRPO) and Delta-L
  loss aggregation, and their measured gradient variance;
* :mod:`~gradnoise.rl.allocators`, :mod:`~gradnoise.rl.adaptive`, :mod:`~gradnoise.rl.bandits` -
  uniform, DAPO dynamic sampling, GVM-RAFT, Reinforce-Ada, VADE and MMR1 VAS behind one protocol;
* :mod:`~gradnoise.rl.composite` - ``SelectThenSample``: a prompt selector (VADE, VAS) composed
  with a within-prompt sampler (Reinforce-Ada);
* :mod:`~gradnoise.rl.loop` - the rollout loop that drives any allocator;
* :mod:`~gradnoise.rl.trl_adapter` - drop-in use with TRL's GRPOTrainer (trl optional).
"""

from gradnoise.rl.adaptive import GVM, DynamicSampling, ReinforceAda
from gradnoise.rl.advantages import (
    bnpo_advantages,
    dr_grpo_advantages,
    fit_beta,
    global_baseline_advantages,
    grpo_advantages,
    opo_advantages,
    rloo_advantages,
    tracker_advantages,
)
from gradnoise.rl.aggregation import (
    AggregationVariance,
    aggregate,
    aggregation_variance,
    aggregation_weights,
)
from gradnoise.rl.allocators import Allocator, RolloutStats, Uniform, apportion
from gradnoise.rl.bandits import VADE, VarianceAwareSampling
from gradnoise.rl.composite import SelectThenSample
from gradnoise.rl.gae import GAE, gae_advantages
from gradnoise.rl.loop import Rollouts, collect_rollouts, zero_variance_mask
from gradnoise.rl.tracker import PromptHistory, ValueTracker

__all__ = [
    "GAE",
    "GVM",
    "VADE",
    "AggregationVariance",
    "Allocator",
    "DynamicSampling",
    "PromptHistory",
    "ReinforceAda",
    "RolloutStats",
    "Rollouts",
    "SelectThenSample",
    "Uniform",
    "ValueTracker",
    "VarianceAwareSampling",
    "aggregate",
    "aggregation_variance",
    "aggregation_weights",
    "apportion",
    "bnpo_advantages",
    "collect_rollouts",
    "dr_grpo_advantages",
    "fit_beta",
    "gae_advantages",
    "global_baseline_advantages",
    "grpo_advantages",
    "opo_advantages",
    "rloo_advantages",
    "tracker_advantages",
    "zero_variance_mask",
]
