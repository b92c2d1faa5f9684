# TRL's GRPO quick start (docs: "GRPO Trainer", train_grpo.py), ported to minigrpo: same model, data and
# reward; the import line is what changes. README, "From Python", shows both side by side.
from datasets import load_dataset

from minigrpo import GRPOConfig, GRPOTrainer

dataset = load_dataset("trl-lib/tldr", split="train")


def reward_len(completions, **kwargs):  # rewards completions that are close to 20 characters
    return [-abs(20 - len(completion)) for completion in completions]


trainer = GRPOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs=reward_len,
                      args=GRPOConfig(output_dir="Qwen2-0.5B-GRPO"), train_dataset=dataset)
trainer.train()
