"""A real chat template calling the sandboxed `python` tool: SmolLM2-135M-Instruct (ChatML, the Hermes / Qwen2.5
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` format), a short cold start that shows it the call, then
GRPO with the tool: the model's code runs in the sandbox (bubblewrap, minigrpo/agent/sandbox.py), its output comes
back as a `tool` message, the reward reads the whole trajectory.

    python examples/python_tool.py                     # SmolLM2-135M-Instruct, 3-digit arithmetic, CPU
    MODEL=tiny-random python examples/python_tool.py   # the same path on a tiny random model

SmolLM2's template does not describe tools and the model never calls one unprompted (measured: no call in 48
samples with the instruction in the system prompt), so the cold start (SFT on conversations whose assistant
turns call python, `completion` as a list of messages) comes first: SFT trains the assistant turns only; the
tool's message is context, exactly the tokens a rollout feeds.
"""

import os

import datasets

from minigrpo import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from minigrpo.tasks.arith import arith_rows, expression

SYSTEM = "Use the python tool to compute. End with a last line of the form '#### <number>'."


def call(expression: str) -> str:
    return '<tool_call>{"name": "python", "arguments": {"code": "print(' + expression + ')"}}</tool_call>'


def conversations(split: str, n: int, steps: int = 1) -> datasets.Dataset:
    """Rows with a prompt (system + question) and, for SFT, a completion that calls python on the whole expression
    and then answers."""
    rows = []
    for row in arith_rows(split, n, steps=steps, max_number=999):
        value = row["answer"].rsplit("#### ", 1)[1]
        rows.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}],
                     "completion": [{"role": "assistant", "content": call(expression(row["answer"]))},
                                    {"role": "tool", "name": "python", "content": value},  # what print() gives
                                    {"role": "assistant", "content": f"#### {value}"}],
                     "answer": row["answer"]})
    return datasets.Dataset.from_list(rows)


if __name__ == "__main__":
    model = os.environ.get("MODEL", "smollm2-135m")
    cold = SFTTrainer(
        model=model,
        args=SFTConfig(use_peft=False, learning_rate=5e-5, per_device_train_batch_size=8, max_steps=12,
                       max_completion_length=64, tools=["python"], max_turns=2, eval_limit=20, eval_steps=0,
                       output_dir="runs/python-tool-sft"),
        train_dataset=conversations("train", 240),
        eval_dataset=conversations("test", 20),
    )
    start = cold.train()
    trainer = GRPOTrainer(
        model=str(start.run_dir / "model"),
        reward_funcs=["correctness"],
        args=GRPOConfig(use_peft=True, learning_rate=2e-4, num_generations=8, per_device_train_batch_size=16,
                        max_completion_length=64, tools=["python"], max_turns=2, max_steps=5, eval_steps=0,
                        eval_limit=20, logging_steps=1, output_dir="runs/python-tool"),
        # two operations per problem now: the cold start only ever wrote one-operation calls
        train_dataset=conversations("train", 240, steps=2).remove_columns("completion"),
        eval_dataset=conversations("test", 20, steps=2).remove_columns("completion"),
    )
    print(trainer.train().metrics)
