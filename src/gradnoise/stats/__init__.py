"""Moments, the quantities computed from them, the GradStats engine, and noise over time."""

from gradnoise.stats.agreement import (
    Agreement,
    SamplingTest,
    agreement,
    agreement_from_norms,
    directional_derivatives,
    inner_product_test,
    orthogonality_test,
)
from gradnoise.stats.clipping import ClippedGradient, clip_factors, clipped_backward
from gradnoise.stats.distributed import NoiseScaleHook, all_reduce_moments
from gradnoise.stats.engine import GradStats, token_mean_weights
from gradnoise.stats.fsdp import FSDPNoiseScaleHook, ShardedStats, gather_sharded
from gradnoise.stats.instruments import (
    AffineVarianceFit,
    TailIndex,
    affine_variance_fit,
    hill_tail_index,
)
from gradnoise.stats.merged import MergedStats
from gradnoise.stats.moments import GradMoments, merge_all, total_moments
from gradnoise.stats.preconditioned import (
    adam_preconditioner,
    adam_preconditioner_fn,
    precondition,
)
from gradnoise.stats.quantities import (
    NoiseScaleEstimate,
    NormTestResult,
    elementwise_variance,
    gradient_noise_scale,
    gsnr,
    layer_gsnr,
    noise_scale_from_sums,
    noise_scale_per_layer,
    norm_test,
    trace_covariance,
    two_batch_estimates,
)
from gradnoise.stats.running import NoiseScale, NoiseScaleReading
from gradnoise.stats.scores import ExampleScores, class_logit_input_grads
from gradnoise.stats.second_moment import SecondMomentProbe, SecondMomentReading
from gradnoise.stats.twobatch import MicroBatchNorms, TwoBatchNorms

__all__ = [
    "AffineVarianceFit",
    "Agreement",
    "ClippedGradient",
    "ExampleScores",
    "FSDPNoiseScaleHook",
    "GradMoments",
    "GradStats",
    "MergedStats",
    "MicroBatchNorms",
    "NoiseScale",
    "NoiseScaleEstimate",
    "NoiseScaleHook",
    "NoiseScaleReading",
    "NormTestResult",
    "SamplingTest",
    "SecondMomentProbe",
    "SecondMomentReading",
    "ShardedStats",
    "TailIndex",
    "TwoBatchNorms",
    "adam_preconditioner",
    "adam_preconditioner_fn",
    "affine_variance_fit",
    "agreement",
    "agreement_from_norms",
    "all_reduce_moments",
    "class_logit_input_grads",
    "clip_factors",
    "clipped_backward",
    "directional_derivatives",
    "elementwise_variance",
    "gather_sharded",
    "gradient_noise_scale",
    "gsnr",
    "hill_tail_index",
    "inner_product_test",
    "layer_gsnr",
    "merge_all",
    "noise_scale_from_sums",
    "noise_scale_per_layer",
    "norm_test",
    "orthogonality_test",
    "precondition",
    "token_mean_weights",
    "total_moments",
    "trace_covariance",
    "two_batch_estimates",
]
