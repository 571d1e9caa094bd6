"""Models as their libraries build and call them, measured by rules only, against the reference.

Each builder in ``gradnoise.testing.hf_models`` makes a small random-weight model from a
``transformers`` config (or peft LoRA on one) and calls it as documented (``labels=`` for the
loss, no ``position_ids``). In float32 every trainable parameter must be measured by a rule (no
fallback), its per-example squared norms and summed gradient must match the per-example autograd
loop within 1e-5 relative, and ``.grad`` must equal a plain backward. Attention key biases are
left out of the float32 comparison: their true gradient is exactly zero (softmax ignores a
per-row shift), so what both sides hold is rounding noise. In float64 every parameter, key biases
included, matches to 1e-9; MobileNetV2 is checked there only, since its 50-odd float32 layers
differ between a batch of 3 and batches of one by ~3e-5 in the reference loop itself.
"""

import pytest
import torch

from gradnoise import GradStats
from gradnoise.testing.check import reference_errors

hf_models = pytest.importorskip("gradnoise.testing.hf_models")
pytest.importorskip("transformers")

TINY_LM = {"d": 16, "layers": 2, "heads": 2, "seq": 8, "vocab": 40}
TINY_VISION = {"image": 16, "d": 16, "layers": 1, "heads": 2, "classes": 3}
SIZES = {
    "gpt2": TINY_LM,
    "bert": TINY_LM,
    "llama": {**TINY_LM, "ffn": 24},
    "llama_tied": {**TINY_LM, "ffn": 24},
    "vit": {**TINY_VISION, "patch": 4},
    "vit_root_params": {**TINY_VISION, "patch": 4},
    "convnext": {"image": 16, "widths": (8, 16), "depths": (1, 1), "classes": 3},
    "resnet18_groupnorm": {
        "image": 16,
        "widths": (8, 8, 16, 16),
        "blocks": 1,
        "groups": 4,
        "classes": 3,
    },
    "resnet_bn_eval": {"image": 16, "widths": (8, 16), "depths": (1, 1), "classes": 3},
    "mobilenet_bn_eval": {"image": 16, "width": 0.35, "classes": 3},
    "llama_lora": {**TINY_LM, "ffn": 24},
    "gpt2_lora": TINY_LM,
}


FLOAT32_BUDGET = {name: 1e-5 for name in SIZES if name != "mobilenet_bn_eval"}
ZERO_GRADIENT = ("key.bias", "k_proj.bias")  # exactly zero in theory: rounding noise only


def _build(name, batch=3):
    if not hf_models.is_available(name):
        pytest.skip(f"{name}: {hf_models.missing_requirements(name)} not installed")
    generator = torch.Generator().manual_seed(0)
    return hf_models.HF_MODELS[name](batch, generator=generator, **SIZES[name])


def _worst(errors, skip=()):
    worst = {
        n: max(per[k] for k in ("sq_norms", "grad_sum", "grad"))
        for n, per in errors.items()
        if not n.endswith(skip)
    }
    return max(worst.values()), sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("name", sorted(FLOAT32_BUDGET))
def test_float32_model_as_called_matches_the_reference(name):
    model, batch, loss_fn = _build(name)
    worst, top = _worst(reference_errors(model, loss_fn, batch), skip=ZERO_GRADIENT)
    assert worst < FLOAT32_BUDGET[name], top


@pytest.mark.parametrize("name", sorted(SIZES))
def test_float64_model_as_called_is_measured_by_rules_exactly(name):
    model, batch, loss_fn = _build(name)
    model = model.double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    errors = reference_errors(model, loss_fn, batch)
    worst, top = _worst(errors)
    # transformers' LM loss upcasts logits to float32: those models' budget is float32's
    assert worst < (1e-5 if "gpt2" in name or "llama" in name else 1e-9), top
    with GradStats(model) as stats:
        loss_fn(model, *batch).backward()
    coverage = stats.coverage()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(errors) == len(trainable)
    fallback = {n: m for n, m in coverage.items() if m.startswith("fallback")}
    assert not fallback, fallback


def test_every_builder_is_listed_here():
    assert set(hf_models.HF_MODELS) == set(SIZES)
