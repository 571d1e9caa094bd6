"""gradnoise: measure, estimate and exploit the noise in stochastic gradients (PyTorch).

The public facade. Measurement lives at the top level (``GradStats``, ``GradMoments``,
``NoiseScale`` and the quantities); the other layers are subpackages:
``gradnoise.estimators`` (Monte Carlo and zeroth-order gradient estimators),
``gradnoise.optim`` (optimizers), ``gradnoise.rl`` (RL post-training), ``gradnoise.data``
(importance sampling and pruning of examples), ``gradnoise.evaluation`` (the variance of
evaluations), ``gradnoise.control`` (controllers),
``gradnoise.workloads`` (built-in offline problems) and ``gradnoise.monitor`` (records, sinks,
report; imported on first use because it pulls in rich and matplotlib).
"""

import importlib

from gradnoise import control, data, estimators, evaluation, layers, optim, rl, stats, workloads
from gradnoise.errors import (
    BatchCouplingError,
    GradNoiseError,
    NotReadyError,
    UnsupportedModuleError,
)
from gradnoise.stats import (
    ExampleScores,
    GradMoments,
    GradStats,
    MicroBatchNorms,
    NoiseScale,
    NoiseScaleEstimate,
    NoiseScaleHook,
    NoiseScaleReading,
    NormTestResult,
    TwoBatchNorms,
    adam_preconditioner,
    agreement,
    elementwise_variance,
    gradient_noise_scale,
    gsnr,
    layer_gsnr,
    merge_all,
    noise_scale_per_layer,
    norm_test,
    precondition,
    token_mean_weights,
    total_moments,
    trace_covariance,
    two_batch_estimates,
)

__version__ = "0.1.0"

_LAZY = {"monitor": "gradnoise.monitor", "Monitor": "gradnoise.monitor"}


def __getattr__(name: str):
    """``gradnoise.monitor`` / ``gradnoise.Monitor`` import rich and matplotlib only when used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'gradnoise' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "monitor" else getattr(module, name)


__all__ = [
    "BatchCouplingError",
    "ExampleScores",
    "GradMoments",
    "GradNoiseError",
    "GradStats",
    "MicroBatchNorms",
    "Monitor",
    "NoiseScale",
    "NoiseScaleEstimate",
    "NoiseScaleHook",
    "NoiseScaleReading",
    "NormTestResult",
    "NotReadyError",
    "TwoBatchNorms",
    "UnsupportedModuleError",
    "__version__",
    "adam_preconditioner",
    "agreement",
    "control",
    "data",
    "elementwise_variance",
    "estimators",
    "evaluation",
    "gradient_noise_scale",
    "gsnr",
    "layer_gsnr",
    "layers",
    "merge_all",
    "monitor",
    "noise_scale_per_layer",
    "norm_test",
    "optim",
    "precondition",
    "rl",
    "stats",
    "token_mean_weights",
    "total_moments",
    "trace_covariance",
    "two_batch_estimates",
    "workloads",
]
