"""MPO in a plain PyTorch loop with a transformers model: sample, score, update.

No Trainer: the loop is the few lines below. The model is the tiny built-in Llama of
`prefopt train` (random weights, no download); swap in any causal LM and reward.

    python examples/mpo_torch_loop.py             # 300 steps, 32 s on 2 cores
    python examples/mpo_torch_loop.py --steps 2   # a smoke run
"""

import argparse
import copy
import random

import torch

import prefopt
from prefopt.cli.task import builtin_model, builtin_tokenizer, copy_task_prompts, copy_task_reward
from prefopt.integrations.data import collate_ids
from prefopt.integrations.transformers import batch_logps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = builtin_tokenizer()
    policy = builtin_model(tokenizer, seed=0)
    reference = copy.deepcopy(policy).requires_grad_(False)  # the frozen starting policy
    # the tiny random model's rate; a pretrained model needs about 1e-5 (docs: prefopt train)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    prompts, _ = copy_task_prompts()
    picker = random.Random(0)
    for step in range(args.steps):
        batch_prompts = [picker.choice(prompts) for _ in range(8)]
        prompt_ids = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
            for p in batch_prompts
        ]
        # 1. sample 8 responses per prompt from the current policy
        with torch.no_grad():
            out = policy.generate(
                input_ids=torch.tensor(prompt_ids), do_sample=True, top_k=0, max_new_tokens=6,
                num_return_sequences=8, pad_token_id=tokenizer.pad_token_id,
            )[:, len(prompt_ids[0]) :]  # fmt: skip
        # 2. score them
        groups = []
        for i, (prompt, ids) in enumerate(zip(batch_prompts, prompt_ids)):
            responses = out[i * 8 : (i + 1) * 8].tolist()
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            groups.append((ids, responses, [copy_task_reward(prompt, t) for t in texts]))
        batch = {
            k: torch.from_numpy(v) for k, v in collate_ids(groups, tokenizer.pad_token_id).items()
        }
        # 3. MPO on the sequence log-probs (prompt and padding tokens never count)
        logps, _ = batch_logps(policy, batch)
        with torch.no_grad():
            ref_logps, _ = batch_logps(reference, batch)
        loss = prefopt.mpo_loss(logps, ref_logps, batch["rewards"], mask=batch["mask"], beta=0.1)
        loss = loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  reward {batch['rewards'].mean():.3f}")


if __name__ == "__main__":
    main()
