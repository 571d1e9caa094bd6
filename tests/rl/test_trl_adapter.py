"""TRL adapter: the sampler and reward hook without trl; GRPOTrainer/RLOOTrainer runs with it.

The trl part builds a 1-layer Llama and a character tokenizer from config (no downloads) and
checks (a) that TRL's own GRPO / Dr. GRPO / batch-scaled / RLOO advantages equal ours on the same
rewards, and (b) that a short GRPOTrainer run draws its prompts from the allocator and feeds it
the rewards. It is skipped when trl is not installed.
"""

import sys

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl import advantages as adv
from gradnoise.rl.allocators import Uniform
from gradnoise.rl.bandits import VADE
from gradnoise.rl.trl_adapter import AllocatorSampler, recording_reward, trl_grpo_kwargs


def test_sampler_yields_the_allocators_prompts_in_repeat_sampler_layout():
    sampler = AllocatorSampler(
        Uniform(20, 2, seed=0),
        20,
        num_generations=3,
        prompts_per_batch=2,
        candidates=5,
        num_batches=2,
        repeat_count=2,
        seed=0,
    )
    out = list(sampler)
    assert len(out) == len(sampler) == 2 * 2 * 3 * 2
    first = out[:12]
    a, b = first[0], first[3]
    assert first == [a, a, a, b, b, b] * 2 and a != b


def test_sampler_refuses_allocators_that_vary_group_sizes():
    from gradnoise.rl.adaptive import GVM

    sampler = AllocatorSampler(
        GVM(20, 2, seed=0),
        20,
        num_generations=4,
        prompts_per_batch=4,
        candidates=6,
        num_batches=1,
        seed=0,
    )
    with pytest.raises(GradNoiseError, match="picks exactly 4 prompts"):
        list(sampler)
    with pytest.raises(GradNoiseError, match="prompts_per_batch <= candidates <= num_prompts"):
        AllocatorSampler(
            Uniform(20, 2, seed=0),
            20,
            num_generations=2,
            prompts_per_batch=4,
            candidates=3,
            num_batches=1,
            seed=0,
        )


def test_recording_reward_feeds_the_allocator_and_keeps_the_name():
    alloc = VADE(10, 2, seed=0)

    def correctness(prompts, completions, **kwargs):
        return [1.0, None, 0.0]

    wrapped = recording_reward(correctness, alloc)
    assert wrapped.__name__ == "correctness"
    assert wrapped(["a"] * 3, ["x"] * 3, prompt_id=[3, 3, 5]) == [1.0, None, 0.0]
    assert alloc.history.n[[3, 5]].tolist() == [1.0, 1.0]
    with pytest.raises(GradNoiseError, match="declared range"):
        recording_reward(lambda p, c, **k: [2.0], alloc)(["a"], ["x"], prompt_id=[1])


def test_trl_kwargs_map_names_and_refuse_what_trl_cannot_express():
    assert trl_grpo_kwargs(advantage="dr_grpo", aggregation="constant") == {
        "scale_rewards": "none",
        "loss_type": "dr_grpo",
    }
    with pytest.raises(GradNoiseError, match="custom loss for OPO"):
        trl_grpo_kwargs(advantage="bnpo")


@pytest.fixture(scope="module")
def tiny():
    """A character tokenizer and a 1-layer Llama built from config; no network."""
    pytest.importorskip("trl")
    try:  # a torchvision wheel that does not match torch breaks transformers' model imports
        import torchvision  # noqa: F401
    except Exception:
        sys.modules["torchvision"] = None
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<bos>", *"0123456789+-= "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    return tokenizer, lambda: LlamaForCausalLM(config)


def dataset(n):
    from datasets import Dataset

    return Dataset.from_dict(
        {"prompt": [f"{i}+{i}=" for i in range(n)], "prompt_id": list(range(n))}
    )


def scripted_reward(rewards):
    def reward(prompts, completions, **kwargs):
        return rewards[: len(completions)]

    return reward


def trl_advantages(tiny, tmp_path, rewards, *, rloo=False, **config):
    """Run TRL's own scoring step on a scripted reward and return its advantages."""
    import trl

    tokenizer, model = tiny
    cls, cfg = (trl.RLOOTrainer, trl.RLOOConfig) if rloo else (trl.GRPOTrainer, trl.GRPOConfig)
    args = cfg(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        **config,
    )
    trainer = cls(
        model=model(),
        reward_funcs=scripted_reward(rewards.tolist()),
        args=args,
        train_dataset=dataset(4),
        processing_class=tokenizer,
    )
    inputs = [
        {"prompt": p, "prompt_id": i} for i, p in enumerate(["1+1=", "2+2="]) for _ in range(4)
    ]
    return trainer._generate_and_score_completions(inputs)["advantages"]


def test_trl_advantages_equal_ours_on_the_same_rewards(tiny, tmp_path):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    grouped = rewards.view(2, 4)
    pairs = [
        ({"scale_rewards": "group"}, adv.grpo_advantages(grouped)),
        ({"scale_rewards": "none"}, adv.dr_grpo_advantages(grouped)),
        ({"scale_rewards": "batch"}, adv.global_baseline_advantages(grouped)),
    ]
    for config, ours in pairs:
        torch.testing.assert_close(
            trl_advantages(tiny, tmp_path, rewards, **config), ours.reshape(-1)
        )
    rloo = trl_advantages(tiny, tmp_path, rewards, rloo=True, beta=0.0)  # beta=0: no ref model
    torch.testing.assert_close(rloo, adv.rloo_advantages(grouped).reshape(-1))


def test_grpo_trainer_runs_with_an_allocator(tiny, tmp_path):
    import trl

    from gradnoise.rl.trl_adapter import allocator_grpo_trainer

    tokenizer, model = tiny
    alloc = VADE(6, 2, seed=0)
    reward = recording_reward(
        lambda prompts, completions, **k: [float(len(c) % 2) for c in completions], alloc
    )
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=3,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        **trl_grpo_kwargs(advantage="dr_grpo"),
    )
    trainer = allocator_grpo_trainer(alloc, candidates=4, seed=0)(
        model=model(),
        reward_funcs=reward,
        args=args,
        train_dataset=dataset(6),
        processing_class=tokenizer,
    )
    trainer.train()
    assert alloc.history.n.sum().item() == 2 * 8  # two steps of 2 prompts x 4 generations
    assert (alloc.history.n[alloc.history.n > 0] % 4 == 0).all()
