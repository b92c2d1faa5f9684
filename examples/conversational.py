"""A conversational dataset (TRL's format: `prompt` is a list of messages) for a math task: the built-in
correctness reward and math accuracy work on it as on GSM8K; the chat template renders the messages as given.

    python examples/conversational.py                  # SmolLM2-135M-Instruct on one-step arithmetic, CPU
    MODEL=tiny-random python examples/conversational.py
"""

import os

import datasets

from minigrpo import GRPOConfig, GRPOTrainer
from minigrpo.tasks.arith import arith_rows

SYSTEM = "Solve the problem. End with a last line of the form '#### <number>'."


def as_messages(split: str, n: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}],
         "answer": row["answer"]}
        for row in arith_rows(split, n, steps=1, max_number=10)])


if __name__ == "__main__":
    trainer = GRPOTrainer(
        model=os.environ.get("MODEL", "smollm2-135m"),
        reward_funcs=["correctness", "format_soft"],
        args=GRPOConfig(use_peft=True, learning_rate=2e-4, reward_weights=[1.0, 0.5], num_generations=8,
                        per_device_train_batch_size=16, max_completion_length=48, max_steps=20, eval_steps=10,
                        eval_limit=50, output_dir="runs/conversational"),
        train_dataset=as_messages("train", 2000),
        eval_dataset=as_messages("test", 50),
    )
    print(trainer.train().metrics)
