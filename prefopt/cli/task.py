"""The built-in task of ``prefopt train``.

A tiny causal LM made from a config (random weights, no download) learns to repeat the last
letter of its prompt.
"""

from __future__ import annotations

import random

import torch

LETTERS = list("abcdefgh")
VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "copy:", *LETTERS]


def builtin_tokenizer():
    """A word-level tokenizer over ``VOCAB``, written in code (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # like Llama's tokenizers: text starts with <bos> unless add_special_tokens=False
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", VOCAB.index("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def builtin_model(tokenizer, seed: int):
    """A 2-layer, 64-wide Llama with random weights (about 0.1 M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def copy_task_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """Prompts ``"copy: x y"``: 48 for training, 16 held out (never trained on)."""
    prompts = [f"copy: {x} {y}" for x in LETTERS for y in LETTERS]
    random.Random(seed).shuffle(prompts)
    return prompts[16:], prompts[:16]


def copy_task_reward(prompt: str, response: str, length: int = 6) -> float:
    """Share of the first ``length`` response words equal to the prompt's last letter."""
    target = prompt.split()[-1]
    words = response.split()[:length]
    return sum(w == target for w in words) / length
