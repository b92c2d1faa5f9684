"""SFT, rejection sampling, plotting and the demo on tiny settings."""

import json

import torch

from minigrpo.config import Config
from minigrpo.sft import collate, encode_pairs, sft
from minigrpo.tasks.arith import arith_rows
from minigrpo.tiny import arith_tokenizer, arith_tools_tokenizer

TINY = dict(model="tiny-arith-init", dataset="arith", arith_steps=1, arith_max_number=5, use_peft=False,
            max_completion_length=16, eval_batch_size=64, num_threads=1, seed=0)


def test_collate_masks_prompt_and_padding():
    tok = arith_tokenizer()
    pairs = encode_pairs(tok, ["<|user|>Hi<|assistant|>", "<|user|>Ann has 7 pens.<|assistant|>"], ["#### 1", "x"])
    ids, attention, loss_mask = collate(pairs, tok.pad_token_id)
    # pair 0: 3 prompt tokens + "####", " 1" + EOS -> predictions of positions 3, 4, 5 count
    assert loss_mask[0].tolist()[:6] == [0, 0, 1, 1, 1, 0]
    assert attention[0].sum() == 6 and ids[0, 5] == tok.eos_token_id
    assert loss_mask[1].sum() == 2  # "x" is unknown -> one token, plus EOS


def test_a_conversation_target_trains_its_assistant_turns_only():
    """A calculator conversation (arith_tool_fraction's rows): the call and the final answer are trained, the tool's
    answer and the next assistant header (what a rollout feeds) are context."""
    tok = arith_tools_tokenizer()
    row = arith_rows("train", 1, steps=2, max_number=99999, tool_fraction=1.0)[0]
    (ids, trained), = encode_pairs(tok, ["<|user|>Q<|assistant|>"], [row["completion"]])
    call, answer, final = (m["content"] for m in row["completion"])
    expect = [("<|user|>Q<|assistant|>", 0), (call, 1), ("<|endoftext|>", 1), (f"<|tool|> {answer}<|assistant|>", 0),
              (final, 1), ("<|endoftext|>", 1)]
    pieces = [tok(text, add_special_tokens=False).input_ids for text, _ in expect]
    assert ids == [i for p in pieces for i in p]
    assert trained == [flag for p, (_, flag) in zip(pieces, expect) for _ in p]
    assert call.startswith("<tool_call>calculator ") and pieces[1][0] == tok.convert_tokens_to_ids("<tool_call>")


def test_sft_learns_the_format(tmp_path):
    run = sft(Config(**TINY, learning_rate=3e-3, per_device_train_batch_size=32, max_steps=60, eval_limit=40,
                     output_dir=str(tmp_path / "sft")), show_progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before"]["eval/format"] == 0.0 and summary["after"]["eval/format"] > 0.8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert (run / "model" / "model.safetensors").exists() and (run / "model" / "tokenizer.json").exists()


def test_rejection_sampling_keeps_only_correct(monkeypatch):
    from minigrpo.rollout.types import Rollout, SamplingParams
    from minigrpo.tasks.arith import arith_rows
    from minigrpo.tasks.rewards import load_reward
    from minigrpo.tasks.sources import _to_example
    from minigrpo.tools import sample as sample_mod

    examples = [_to_example(row, f"arith row {i}", "question", "answer")
                for i, row in enumerate(arith_rows("train", 2, steps=1, max_number=5))]
    golds = [ex.columns["answer"] for ex in examples]
    texts = [f"#### {golds[0]}", "#### 99", f"#### {golds[0]}", "#### 98",  # prompt 0: 2 right (1 distinct)
             "#### 97", "#### 96", "#### 95", "#### 94"]  # prompt 1: none right

    def fake_generate(backend, model, tok, prompts, params):
        z = torch.zeros(8, 1)
        return Rollout(z.long(), z.long(), z.long(), z + 1, torch.zeros(8, dtype=torch.bool),
                       [p for p in prompts for _ in range(4)], texts)

    monkeypatch.setattr(sample_mod, "generate", fake_generate)
    rows, stats = sample_mod.rejection_sample(None, None, ["p0", "p1"], examples, SamplingParams(n=4),
                                              [("correctness", load_reward("correctness"), 1.0)])
    assert rows == [{"question": examples[0].question, "answer": f"#### {golds[0]}", "gold": golds[0]}]
    assert stats["mean_pass_rate"] == 0.25 and stats["prompts_with_a_kept_sample"] == 0.5
    assert stats["pass_rate_histogram"] == {0.0: 1, 0.5: 1}
    best, _ = sample_mod.rejection_sample(None, None, ["p0", "p1"], examples, SamplingParams(n=4),
                                          [("correctness", load_reward("correctness"), 1.0)], keep="best", best_k=1)
    assert len(best) == 2  # one per prompt, whatever its reward


def test_plot_writes_png(tmp_path):
    from minigrpo.tools.plot import plot_run

    rows = [{"step": 0, "eval/accuracy": 0.1}] + [
        {"step": s, "train/reward": s / 10, "train/rewards/correctness": s / 10, "train/accuracy": s / 10,
         "completions/mean_length": 20.0, "train/kl": 0.01 * s, "train/entropy": 1.0, "perf/step_s": 0.5}
        for s in range(1, 6)] + [{"step": 5, "eval/accuracy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # several runs: overlaid, one colour per run (minigrpo plot A B): saved as the first run's compare.png
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps(r | {"rollout/logprob_diff_mean": 1e-5}) + "\n"
                                                 for r in rows))
    both = plot_run([tmp_path, other])
    assert both == tmp_path / "compare.png" and both.stat().st_size > png.stat().st_size


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    from minigrpo.tools import demo

    monkeypatch.setattr(demo, "BASE", demo.BASE | {"eval_limit": 20, "arith_train_size": 200})
    table = demo.run_demo(str(tmp_path / "demo"), scale=0.02, show_progress=False)
    assert [r["stage"] for r in table] == ["1. cold-start SFT", "2. GRPO (reward only)", "3. rejection sampling",
                                           "4. SFT on rejection samples"]
    assert (tmp_path / "demo" / "stages.json").exists()
