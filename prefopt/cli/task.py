"""The built-in tasks of ``prefopt train``.

- The copy task, for the tiny built-in model: a causal LM made from a config (random
  weights, no download) learns to repeat the last letter of its prompt.
- The addition task, for a pretrained chat model: "What is 3 + 4? Reply with the number
  only." A reply whose last number is the sum scores 1, any other 0.
"""

from __future__ import annotations

import random
import re

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
    import torch
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


ADDITION = "What is {a} + {b}? Reply with the number only."


def addition_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """The 100 single-digit additions: 76 for training, 24 held out (never trained on)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    prompts = [ADDITION.format(a=a, b=b) for a, b in pairs]
    return prompts[24:], prompts[:24]


def addition_reward(prompt: str, response: str) -> float:
    """1 when the last number of the reply is the sum, else 0.

    ``"7"``, ``"The sum is 7."`` and ``"3 + 4 = 7"`` score 1; ``"8"``, ``"7, or 8"`` and, for
    ``0 + 7``, ``"The equation 0 + 7 is"`` (the question restated) 0. The
    reply's form is not scored: rewarding the number alone (which the base model says in
    1 to 3 % of replies) taught SmolLM2-135M-Instruct the form ``"3 + 4 = 7"`` with a credit
    for it and nothing without one, never the bare number (docs: the prefopt train page).
    """
    a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
    # the question restated ("0 + 7") is no answer, though its last number may be the sum
    answer = re.sub(rf"(?<!\d){a}\s*\+\s*{b}(?!\d)", " ", response)
    numbers = re.findall(r"-?\d+", answer)
    return 1.0 if numbers and numbers[-1] == str(a + b) else 0.0
