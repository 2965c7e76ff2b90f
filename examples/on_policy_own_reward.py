"""On-policy MPO on your own model, prompts and reward, from Python (what
``prefopt train --model DIR --prompts FILE --reward FILE.py:FUNCTION`` does).

The model here is a tiny Llama built from a config and saved, so that the script runs
anywhere without a download; point ``model`` at your own checkpoint directory instead.

    python examples/on_policy_own_reward.py              # 200 steps, 30 s on 2 cores
    python examples/on_policy_own_reward.py --steps 2    # a smoke run
"""

import argparse
import json
import pathlib
import random
import tempfile

from prefopt.cli.task import builtin_model, builtin_tokenizer
from prefopt.cli.train import Config, run

REWARD = '''
def score(prompts, responses):
    """Share of the response's words equal to the prompt's last word."""
    out = []
    for prompt, response in zip(prompts, responses):
        words = response.split()
        out.append(sum(w == prompt.split()[-1] for w in words) / max(len(words), 1))
    return out
'''


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="prefopt-own-"))
    tokenizer = builtin_tokenizer()
    builtin_model(tokenizer, seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = [{"prompt": f"copy: {a} {b}"} for a in "abcdefgh" for b in "abcdefgh"]
    random.Random(0).shuffle(prompts)  # 48 to train on, 16 held out
    (root / "prompts.jsonl").write_text("\n".join(map(json.dumps, prompts[16:])))
    (root / "heldout.jsonl").write_text("\n".join(map(json.dumps, prompts[:16])))
    (root / "reward.py").write_text(REWARD)
    records = run(
        Config(
            model=str(root / "model"),
            prompts=str(root / "prompts.jsonl"),
            eval_prompts=str(root / "heldout.jsonl"),
            reward=f"{root / 'reward.py'}:score",
            steps=args.steps,
            eval_every=max(args.steps // 2, 1),
            output=str(root / "run"),
            progress=False,
        )
    )
    start, end = records[0]["heldout_reward_start"], records[-1]["heldout_reward"]
    print(f"{len(records)} steps; held-out reward {start:.3f} -> {end:.3f}; outputs in {root}/run")


if __name__ == "__main__":
    main()
