"""Real-architecture models for the tests and ``benchmarks/real_models.py``, with random weights.

Every model is built from a ``transformers`` ``*Config`` (or written here with ``torch.nn``), so
nothing is downloaded. Each ``make_<name>(batch=..., *, generator=None, **size)`` returns
``(model, batch, loss_fn)`` like :mod:`gradnoise.testing.models`: ``loss_fn(model, *batch)`` is the
mean over the examples of per-example losses, so a reference loop over batches of one sees each
example's own loss; it calls the model the way its library documents (``model(input_ids=ids,
labels=ids).loss`` for a causal LM: no ``position_ids``, no mask). The default sizes are the
benchmark's; tests pass small ones (``d``, ``layers``, ``seq``, ``image``, ...).

Dropout is 0 everywhere. ``generator`` seeds the weights (in a forked RNG, so the global one is
left alone) as well as the data; without it the global RNG is used. ``transformers`` and ``peft``
are imported inside the builders, so this module imports without them; :func:`available_models`
says which builders can run here.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HF_MODELS",
    "REQUIREMENTS",
    "RootParamViT",
    "available_models",
    "is_available",
    "lm_loss",
    "make_bert",
    "make_convnext",
    "make_gpt2",
    "make_gpt2_lora",
    "make_llama",
    "make_llama_lora",
    "make_llama_tied",
    "make_mobilenet_bn_eval",
    "make_padded_lm",
    "make_resnet18_groupnorm",
    "make_resnet_bn_eval",
    "make_vit",
    "make_vit_root_params",
    "missing_requirements",
    "pixel_loss",
    "resnet18_groupnorm",
    "sequence_classification_loss",
]


# ------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _weights_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Seed the global RNG from ``generator`` for the model's init, restoring it afterwards."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's own shifted token-mean loss; with equal lengths, the mean of sequence means."""
    return model(input_ids=input_ids, labels=input_ids).loss


def padded_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The library's loss on ``labels`` with -100 on padding: the mean over all counted tokens."""
    return model(input_ids=input_ids, labels=labels).loss


def padded_lm_loss_masked(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def sequence_classification_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return model(input_ids=input_ids, labels=labels).loss


def pixel_loss(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``model(pixel_values=x, labels=y).loss``: cross-entropy averaged over the images."""
    return model(pixel_values=pixel_values, labels=labels).loss


def _classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _images(batch, image, classes, generator, channels=3):
    x = torch.randn(batch, channels, image, image, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, y


def _eval_batchnorm(model: nn.Module, generator: torch.Generator | None) -> int:
    """Put every BatchNorm in eval mode with random running statistics; returns how many.

    Fresh running statistics (mean 0, variance 1) would make the eval-mode BatchNorm a plain
    affine map of its input scaled by ~1; random ones make it a distinct one per channel.
    Only the BatchNorms are switched: ``model.train()`` afterwards switches them back.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            with torch.no_grad():
                if module.running_mean is not None:
                    module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                    module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.eval()
            count += 1
    return count


# ------------------------------------------------------------------------------- language models
def _gpt2(*, d, layers, heads, seq, vocab, tie):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=seq,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        tie_word_embeddings=tie,
        bos_token_id=vocab - 1,  # GPT-2's 50256 would lie outside a small vocabulary
        eos_token_id=vocab - 1,
    )
    return GPT2LMHeadModel(config)


def make_gpt2(
    batch: int = 16,
    *,
    generator: torch.Generator | None = None,
    d: int = 256,
    layers: int = 2,
    heads: int = 4,
    seq: int = 128,
    vocab: int = 1000,
    tie: bool = True,
):
    """GPT2LMHeadModel (tied by default, as GPT-2 is), random tokens; ``batch = (input_ids,)``.

    Its linear layers are ``transformers.pytorch_utils.Conv1D`` (``torch.addmm(bias, x2d, W)``
    with ``W`` stored ``(in, out)``); positions are looked up with a ``(1, T)`` index.
    """
    with _weights_rng(generator):
        model = _gpt2(d=d, layers=layers, heads=heads, seq=seq, vocab=vocab, tie=tie)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return model, (ids,), lm_loss


def make_bert(
    batch: int = 16,
    *,
    generator: torch.Generator | None = None,
    d: int = 256,
    layers: int = 2,
    heads: int = 4,
    seq: int = 128,
    vocab: int = 1000,
    classes: int = 4,
):
    """BertForSequenceClassification; ``batch = (input_ids, labels)`` with class ids.

    No mask and no ``token_type_ids``: BERT expands its zero ``token_type_ids`` buffer and its
    ``(1, T)`` ``position_ids`` buffer itself; the pooler (dense + tanh on [CLS]) is trained.
    """
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * d,
        max_position_embeddings=seq,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=classes,
    )
    with _weights_rng(generator):
        model = BertForSequenceClassification(config)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return model, (ids, labels), sequence_classification_loss


def _llama(*, d, layers, heads, kv_heads, ffn, seq, vocab, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
        attention_dropout=0.0,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def make_llama(
    batch: int = 16,
    *,
    generator: torch.Generator | None = None,
    d: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 688,
    seq: int = 128,
    vocab: int = 1000,
    tie: bool = False,
):
    """LlamaForCausalLM (RMSNorm, rotary positions, SwiGLU, grouped-query attention with
    ``kv_heads`` key/value heads, no biases), untied; ``batch = (input_ids,)``."""
    with _weights_rng(generator):
        model = _llama(
            d=d,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            ffn=ffn,
            seq=seq,
            vocab=vocab,
            tie=tie,
        )
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return model, (ids,), lm_loss


def make_llama_tied(batch: int = 16, *, generator: torch.Generator | None = None, **size):
    """:func:`make_llama` with ``tie_word_embeddings=True`` (``lm_head.weight is embed_tokens``)."""
    return make_llama(batch, generator=generator, tie=True, **size)


def make_padded_lm(
    batch: int = 8,
    seq: int = 32,
    *,
    generator: torch.Generator | None = None,
    arch: str = "gpt2",
    attention_mask: bool = False,
    min_length: int = 2,
    **size,
):
    """A causal LM on right-padded sequences of different lengths, for padded token-mean losses.

    Returns ``(model, batch, loss_fn)`` with ``batch = (input_ids, labels)`` (or ``(input_ids,
    attention_mask, labels)`` with ``attention_mask=True``): sequence ``i`` has ``lengths[i]``
    real tokens (all different where ``batch <= seq - min_length + 1``, the first one ``seq``),
    ``labels`` is ``input_ids`` there and -100 on the padding, whose ids are 0. ``loss_fn`` is the
    library's own loss, the mean over the ``sum_i (lengths[i] - 1)`` counted tokens, NOT the mean
    of per-sequence means: example ``i`` weighs ``(lengths[i] - 1) / sum_j (lengths[j] - 1)``.
    Right padding under a causal mask leaves the real positions untouched, so the mask is
    optional. ``arch`` is ``"gpt2"`` or ``"llama"``; ``size`` goes to its builder (``d``, ...).
    """
    builders = {"gpt2": make_gpt2, "llama": make_llama}
    if arch not in builders:
        raise ValueError(f"arch must be one of {sorted(builders)}, got {arch!r}")
    model, (ids,), _ = builders[arch](batch, generator=generator, seq=seq, **size)
    span = seq - min_length + 1
    if batch <= span:
        lengths = seq - torch.randperm(span, generator=generator)[:batch]
        lengths[lengths == seq] = lengths[0].clone()
        lengths[0] = seq
    else:
        lengths = torch.randint(min_length, seq + 1, (batch,), generator=generator)
        lengths[0] = seq
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~mask, 0)
    labels = ids.masked_fill(~mask, -100)
    if attention_mask:
        return model, (ids, mask.long(), labels), padded_lm_loss_masked
    return model, (ids, labels), padded_lm_loss


def _lora(model, *, r, target_modules, fan_in_fan_out, generator):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=target_modules,
        fan_in_fan_out=fan_in_fan_out,
    )
    with _weights_rng(generator):
        model = get_peft_model(model, config)
        # peft starts lora_B at zero, which makes every lora_A gradient zero; give it a small
        # random value so both factors have per-example gradients worth comparing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    param.normal_(0.0, 0.02)
    return model


def make_llama_lora(
    batch: int = 16, *, generator: torch.Generator | None = None, r: int = 8, **size
):
    """:func:`make_llama` wrapped by peft LoRA (rank ``r``, alpha ``2r``) on q/k/v/o_proj.

    The base model is frozen (only ``lora_A`` / ``lora_B`` train); ``lora_B`` is random rather
    than peft's zeros. ``model`` is a ``PeftModelForCausalLM``; the loss is the same call.
    """
    model, batch_tensors, loss_fn = make_llama(batch, generator=generator, **size)
    target = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = _lora(model, r=r, target_modules=target, fan_in_fan_out=False, generator=generator)
    return model, batch_tensors, loss_fn


def make_gpt2_lora(
    batch: int = 16, *, generator: torch.Generator | None = None, r: int = 8, **size
):
    """:func:`make_gpt2` with peft LoRA on the attention's ``c_attn`` and ``c_proj`` (Conv1D, so
    ``fan_in_fan_out=True``); base frozen, ``lora_B`` random."""
    model, batch_tensors, loss_fn = make_gpt2(batch, generator=generator, **size)
    target = r".*\.attn\.(c_attn|c_proj)"
    model = _lora(model, r=r, target_modules=target, fan_in_fan_out=True, generator=generator)
    return model, batch_tensors, loss_fn


# -------------------------------------------------------------------------------- vision models
def make_vit(
    batch: int = 8,
    *,
    generator: torch.Generator | None = None,
    image: int = 32,
    patch: int = 4,
    d: int = 192,
    layers: int = 4,
    heads: int = 3,
    classes: int = 10,
):
    """ViTForImageClassification; ``batch = (pixel_values, labels)``.

    ``cls_token`` and ``position_embeddings`` are bare parameters of ``vit.embeddings`` (expanded
    over the batch / broadcast-added); the patch embedding is a strided ``nn.Conv2d``; the
    classifier reads the final LayerNorm's [CLS] token (no pooler).
    """
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image,
        patch_size=patch,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * d,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=classes,
    )
    with _weights_rng(generator):
        model = ViTForImageClassification(config)
    return model, _images(batch, image, classes, generator), pixel_loss


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class RootParamViT(nn.Module):
    """A timm-style ViT whose ``cls_token`` and ``pos_embed`` are bare parameters of the root.

    ``forward``: ``nn.Conv2d`` patches -> ``cat([cls_token.expand(B, -1, -1), x], 1) +
    pos_embed`` -> pre-LN blocks (fused ``qkv`` ``nn.Linear``, SDPA, ``proj``; GELU MLP) ->
    LayerNorm -> ``head`` on the class token.
    """

    def __init__(
        self,
        image: int = 32,
        patch: int = 4,
        dim: int = 192,
        layers: int = 2,
        heads: int = 3,
        classes: int = 10,
        channels: int = 3,
    ) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads, 4 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def make_vit_root_params(
    batch: int = 8,
    *,
    generator: torch.Generator | None = None,
    image: int = 32,
    patch: int = 4,
    d: int = 192,
    layers: int = 2,
    heads: int = 3,
    classes: int = 10,
):
    """:class:`RootParamViT` (no transformers needed); ``batch = (x, y)``, cross-entropy."""
    with _weights_rng(generator):
        model = RootParamViT(image, patch, d, layers, heads, classes)
    return model, _images(batch, image, classes, generator), _classification_loss


def make_convnext(
    batch: int = 8,
    *,
    generator: torch.Generator | None = None,
    image: int = 32,
    patch: int = 2,
    widths: tuple[int, ...] = (48, 96, 192, 384),
    depths: tuple[int, ...] = (1, 1, 3, 1),
    classes: int = 10,
    layer_scale: float = 0.1,
):
    """ConvNextForImageClassification: a ``patch``-strided stem, then per block a depthwise 7x7
    ``nn.Conv2d``, ``ConvNextLayerNorm`` over channels (channels-last ``F.layer_norm``),
    ``nn.Linear`` 4x MLP and the layer-scale vector ``gamma`` (a bare parameter, multiplied in);
    strided 2x2 convs between stages (maps 16, 8, 4, 2 at the defaults).

    ``layer_scale`` starts ``gamma`` at 0.1 rather than ConvNeXt's 1e-6, so that the gradients
    of the block weights (all scaled by ``gamma``) are not vanishingly small in the tests.
    """
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        patch_size=patch,
        num_stages=len(widths),
        hidden_sizes=list(widths),
        depths=list(depths),
        layer_scale_init_value=layer_scale,
        drop_path_rate=0.0,
        image_size=image,
        num_labels=classes,
    )
    with _weights_rng(generator):
        model = ConvNextForImageClassification(config)
    return model, _images(batch, image, classes, generator), pixel_loss


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(min(groups, cout), cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(groups, cout), cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


def resnet18_groupnorm(
    widths: tuple[int, ...] = (64, 128, 256, 512),
    blocks: int = 2,
    classes: int = 10,
    groups: int = 32,
    stem: int | None = None,
) -> nn.Sequential:
    """ResNet-18 layout with GroupNorm: 7x7/2 conv + 3x3/2 maxpool stem, stages of ``blocks``
    BasicBlocks (3x3 convs, stride 2 from the second stage, 1x1 projection shortcuts),
    global average pool, linear head. ``groups`` is capped by the channel count."""
    stem = stem or widths[0]
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 7, 2, 3, bias=False),
        nn.GroupNorm(min(groups, stem), stem),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = stem
    for i, width in enumerate(widths):
        for j in range(blocks):
            layers.append(_BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, groups))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def make_resnet18_groupnorm(
    batch: int = 8,
    *,
    generator: torch.Generator | None = None,
    image: int = 32,
    widths: tuple[int, ...] = (64, 128, 256, 512),
    blocks: int = 2,
    classes: int = 10,
    groups: int = 32,
):
    """:func:`resnet18_groupnorm` on ``image``-square inputs (no transformers needed).

    At 32x32 the stages run on 8x8, 4x4, 2x2 and 1x1 maps (at 64x64: 16, 8, 4, 2), so the last
    stage's 3x3 convolutions see mostly padding.
    """
    with _weights_rng(generator):
        model = resnet18_groupnorm(widths, blocks, classes, groups)
    return model, _images(batch, image, classes, generator), _classification_loss


def make_resnet_bn_eval(
    batch: int = 8,
    *,
    generator: torch.Generator | None = None,
    image: int = 32,
    widths: tuple[int, ...] = (64, 128, 256, 512),
    depths: tuple[int, ...] = (2, 2, 2, 2),
    classes: int = 10,
):
    """ResNetForImageClassification, ResNet-18 config (basic blocks), BatchNorm in eval mode.

    The BatchNorms alone are in eval mode, with random running statistics (the model stays
    ``training``; ``model.train()`` would switch them back). 7x7/2 stem + maxpool: maps 8, 4, 2, 1
    at 32x32.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=widths[0],
        hidden_sizes=list(widths),
        depths=list(depths),
        layer_type="basic",
        num_labels=classes,
    )
    with _weights_rng(generator):
        model = ResNetForImageClassification(config)
    _eval_batchnorm(model, generator)
    return model, _images(batch, image, classes, generator), pixel_loss


def make_mobilenet_bn_eval(
    batch: int = 8,
    *,
    generator: torch.Generator | None = None,
    image: int = 32,
    width: float = 1.0,
    classes: int = 10,
):
    """MobileNetV2ForImageClassification (inverted residuals: 1x1 expand, depthwise 3x3, 1x1
    project; ReLU6; TF "same" padding), BatchNorm in eval mode with random running statistics,
    classifier dropout 0. ``width`` is the config's ``depth_multiplier``."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        image_size=image,
        depth_multiplier=width,
        classifier_dropout_prob=0.0,
        num_labels=classes,
    )
    with _weights_rng(generator):
        model = MobileNetV2ForImageClassification(config)
    _eval_batchnorm(model, generator)
    return model, _images(batch, image, classes, generator), pixel_loss


# ------------------------------------------------------------------------------------- registry
HF_MODELS: dict[str, Callable] = {
    "gpt2": make_gpt2,
    "bert": make_bert,
    "llama": make_llama,
    "llama_tied": make_llama_tied,
    "vit": make_vit,
    "vit_root_params": make_vit_root_params,
    "convnext": make_convnext,
    "resnet18_groupnorm": make_resnet18_groupnorm,
    "resnet_bn_eval": make_resnet_bn_eval,
    "mobilenet_bn_eval": make_mobilenet_bn_eval,
    "llama_lora": make_llama_lora,
    "gpt2_lora": make_gpt2_lora,
}

_PURE_TORCH = ("vit_root_params", "resnet18_groupnorm")
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    name: ()
    if name in _PURE_TORCH
    else ("transformers", "peft")
    if "lora" in name
    else ("transformers",)
    for name in HF_MODELS
}


def missing_requirements(name: str) -> list[str]:
    """The packages ``HF_MODELS[name]`` needs that cannot be imported here."""
    return [pkg for pkg in REQUIREMENTS[name] if importlib.util.find_spec(pkg) is None]


def is_available(name: str) -> bool:
    return not missing_requirements(name)


def available_models() -> list[str]:
    """Names in :data:`HF_MODELS` whose builders can run here (transformers / peft importable)."""
    return [name for name in HF_MODELS if is_available(name)]
