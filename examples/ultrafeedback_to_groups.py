"""Convert TRL/UltraFeedback-style rows (one prompt, 4 rated completions) to prefopt's
group rows, one JSON object per line, ready for `prefopt train --data`.

UltraFeedback stores, per prompt, a list of ``completions``, each with its ``response``
and an ``overall_score`` (and per-aspect ``annotations``). A group row keeps every rated
completion with its score as the reward: MPO then contrasts all above-average completions
with the rest instead of keeping only one pair, as the binarised dataset does.

    python examples/ultrafeedback_to_groups.py --output groups.jsonl            # built-in sample
    python examples/ultrafeedback_to_groups.py --input raw.jsonl --output groups.jsonl
    prefopt train --data groups.jsonl --model ./your-model --steps 20

(``--model``: the built-in model's toy tokenizer knows 12 words, and refuses this text.)
"""

import argparse
import json
import math

SAMPLE = [
    {
        "instruction": "Name a prime number between 10 and 20.",
        "completions": [
            {"response": "13 is a prime number between 10 and 20.", "overall_score": 9.0},
            {"response": "15.", "overall_score": 2.0},
            {"response": "Both 11 and 17 are, among others.", "overall_score": 8.5},
            {"response": "There are none.", "overall_score": 1.0},
        ],
    },
    {
        "instruction": "Translate 'bonjour' to English.",
        "completions": [
            {"response": "Hello.", "overall_score": 9.5},
            {"response": "Good day, or hello.", "overall_score": 8.0},
            {"response": "Goodbye.", "overall_score": 1.5},
            {"response": "It is French.", "overall_score": 3.0},
        ],
    },
]


def to_group(row, scale=0.1):
    """One UltraFeedback row to a group row; scores scaled so that MPO's alpha=1 suits them.

    Completions without a finite score are dropped; a prompt left with fewer than two is
    skipped (None), since a group needs something to compare. A standard row's response is
    the text that follows its prompt (as in TRL), so each starts with a newline.
    """
    prompt = row.get("instruction") or row.get("prompt")
    scored = [
        (c["response"], float(c["overall_score"]))
        for c in row.get("completions", [])
        if isinstance(c.get("overall_score"), (int, float)) and math.isfinite(c["overall_score"])
    ]
    if not prompt or len(scored) < 2:
        return None
    return {
        "prompt": prompt,
        "responses": ["\n" + text for text, _ in scored],
        "rewards": [score * scale for _, score in scored],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", help="JSONL of UltraFeedback rows (default: a built-in sample)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--scale", type=float, default=0.1, help="reward = score * scale")
    args = parser.parse_args()
    rows = SAMPLE
    if args.input:
        with open(args.input) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    kept = 0
    with open(args.output, "w") as f:
        for row in rows:
            group = to_group(row, args.scale)
            if group is not None:
                f.write(json.dumps(group) + "\n")
                kept += 1
    print(f"wrote {kept} group rows ({len(rows) - kept} skipped) to {args.output}")


if __name__ == "__main__":
    main()
