"""Train the tiny built-in model with GroupPreferenceGRPOTrainer for a few steps; save it.

Run directly for one process, or under ``torchrun --nproc_per_node 2`` (gloo on CPU);
``--batch`` is the per-process batch of completions. The completions come from a
deterministic rollout (TRL's ``rollout_func``): completion k of a prompt depends on the
prompt and k alone, so one process and two see the same groups. Rank 0 writes
``result.pt`` (parameters and logged losses) to ``--out``.
"""

import argparse
import os

import datasets
import transformers
import trl
from _result import save_result

from prefopt.cli.task import LETTERS, builtin_model, builtin_tokenizer, copy_task_reward
from prefopt.integrations.trl import GroupPreferenceGRPOTrainer


def rollout(prompts, trainer):
    """Completion k of a prompt: k copies of its last letter, then other letters (6 tokens)."""
    tok = trainer.processing_class
    seen, prompt_ids, completion_ids = {}, [], []
    for p in prompts:
        k = seen[p] = seen.get(p, -1) + 1
        target = p.split()[-1]
        other = LETTERS[(LETTERS.index(target) + 1) % len(LETTERS)]
        words = [target] * (k % 4) + [other] * (6 - k % 4)
        prompt_ids.append(tok(p)["input_ids"])
        completion_ids.append(tok(" ".join(words), add_special_tokens=False)["input_ids"])
    logprobs = [[0.0] * len(c) for c in completion_ids]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def reward(prompts, completions, **kwargs):
    return [copy_task_reward(p, c) for p, c in zip(prompts, completions)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = builtin_tokenizer()
    prompts = datasets.Dataset.from_list(
        [{"prompt": f"copy: {a} {b}"} for a in "abcd" for b in "efgh"]
    )
    config = trl.GRPOConfig(
        output_dir=os.path.join(args.out, "trainer"), num_generations=4,
        per_device_train_batch_size=args.batch, max_completion_length=6, max_steps=args.steps,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", report_to=[],
        logging_steps=1, use_cpu=True, seed=0, data_seed=0, save_strategy="no", disable_tqdm=True,
        bf16=False,  # GRPOConfig defaults to bf16: float32 for a comparison to rounding
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )  # fmt: skip
    trainer = GroupPreferenceGRPOTrainer(
        builtin_model(tok, 0), reward_funcs=reward, args=config, train_dataset=prompts,
        processing_class=tok, rollout_func=rollout,
    )  # fmt: skip
    trainer.train()
    save_result(trainer, args.out)


if __name__ == "__main__":
    main()
