"""Train the tiny built-in model with PreferenceTrainer for a few steps and save the result.

Run directly for one process, or under ``torchrun --nproc_per_node 2`` for data parallelism
(gloo on CPU); ``--batch`` is the per-process batch size. Rank 0 writes ``result.pt``
(parameters and logged losses) to ``--out``. ``--fsdp`` asks for FSDP, which accelerate
enables on GPUs only: the trainer must refuse rather than run plain DDP.
"""

import argparse
import os

import transformers
from _result import save_result

from prefopt.cli.task import builtin_model, builtin_tokenizer
from prefopt.integrations.transformers import PreferenceConfig, PreferenceTrainer

ROWS = [
    {"prompt": f"copy: {a} {b}",
     "responses": [f" {b} {b}", f" {a}", f" {b} c d", f" {b}"][: 2 + i % 3],
     "rewards": [1.0, 0.0, 0.3, 0.8][: 2 + i % 3]}
    for i, (a, b) in enumerate(zip("abcdefghabcdefgh", "hgfedcbaabcdefgh"))
]  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loss", default="mpo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    tok = builtin_tokenizer()
    training = PreferenceConfig(
        output_dir=os.path.join(args.out, "trainer"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        loss_type=args.loss,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=0,
        data_seed=0,
        save_strategy="no",
        disable_tqdm=True,
        **({"fsdp": "full_shard"} if args.fsdp else {}),
    )
    trainer = PreferenceTrainer(
        builtin_model(tok, 0),
        ref_model=builtin_model(tok, 1),
        args=training,
        train_dataset=ROWS,
        processing_class=tok,
    )
    trainer.train()
    save_result(trainer, args.out)


if __name__ == "__main__":
    main()
