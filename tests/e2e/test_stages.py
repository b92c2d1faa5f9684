"""SFT, rejection sampling, plotting and the demo on tiny settings."""

import json
import re
from pathlib import Path

import pytest
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
    assert rows == [{"question": examples[0].question, "completion": f"#### {golds[0]}", "answer": golds[0]}]
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


ASSET = Path(__file__).resolve().parents[2] / "minigrpo" / "assets" / "tiny-arith"
VERDICT = re.compile(r"####\s*([0-9]+)")


def arith_judge(tmp_path):
    """The shipped tiny-arith model as a judge whose rubric it follows: the "answer" it reads is an arith problem,
    which it works out; the number after its `####` is the verdict (out of 10)."""
    from minigrpo.tasks.model_rewards import Judge

    rubric = tmp_path / "rubric.txt"
    rubric.write_text("{answer}")
    return Judge(str(ASSET), rubric=str(rubric), pattern=VERDICT.pattern, max_tokens=32)


def test_rejection_sampling_keeps_what_the_judge_accepts(monkeypatch, tmp_path):
    """A real judge on known completions: kept is exactly what its own answers (read here with the test's regex)
    score >= 0.8, and its precision and recall against the rule are the hand count."""
    from minigrpo.rollout.types import Rollout, SamplingParams
    from minigrpo.tasks.sources import _to_example
    from minigrpo.tools import sample as sample_mod

    examples = [_to_example(row, f"arith row {i}", "question", "answer")
                for i, row in enumerate(arith_rows("train", 2, steps=1, max_number=5))]
    golds = [ex.columns["answer"] for ex in examples]
    problems = [row["question"] for row in arith_rows("test", 6, steps=1, max_number=9)]  # what the judge works out
    texts = [f"{problems[0]} #### {golds[0]}", problems[1], problems[2], f"{problems[0]} #### {golds[0]}",
             problems[3], f"{problems[4]} #### {golds[1]}", problems[5], f"#### {golds[1]}"]

    def fake_generate(backend, model, tok, prompts, params):
        z = torch.zeros(8, 1)
        return Rollout(z.long(), z.long(), z.long(), z + 1, torch.zeros(8, dtype=torch.bool),
                       [p for p in prompts for _ in range(4)], texts)

    monkeypatch.setattr(sample_mod, "generate", fake_generate)
    judge = arith_judge(tmp_path)
    rows, stats = sample_mod.rejection_sample(None, None, ["p0", "p1"], examples, SamplingParams(n=4), [],
                                              keep="judge", judge=judge, threshold=0.8)
    scores = [min(1.0, int(VERDICT.findall(o)[-1]) / 10) if VERDICT.search(o) else None for o in judge.outputs]
    assert len(scores) == 8 and 0 < sum(s is not None and s >= 0.8 for s in scores) < 8, judge.outputs
    accepted = [i for i in range(8) if scores[i] is not None and scores[i] >= 0.8]
    expected = list(dict.fromkeys((i // 4, texts[i]) for i in accepted))  # per prompt, distinct texts
    assert [(examples.index(next(e for e in examples if e.question == r["question"])), r["completion"])
            for r in rows] == expected
    assert all(r["judge_score"] == scores[texts.index(r["completion"])] and r["answer"] in golds for r in rows)
    right = [i in (0, 3, 5, 7) for i in range(8)]  # the rule reads `#### gold` at their end
    hits = sum(right[i] for i in accepted)
    assert stats["judge_accepted"] == len(accepted) and stats["kept"] == len(expected)
    assert stats["judge_failures"] == scores.count(None)
    judged = [i for i in range(8) if scores[i] is not None]  # the ratios count the samples it has a verdict on
    assert stats["judge_precision"] == hits / len(accepted)
    assert stats["judge_recall"] == hits / sum(right[i] for i in judged)
    assert stats["judge_agreement_with_rule"] == sum((i in accepted) == right[i] for i in judged) / len(judged)
    assert stats["judge_accept_rate"] == len(accepted) / 8 and stats["mean_pass_rate"] == 0.5  # the rule's


def test_rejection_sampling_with_a_judge_by_hand(monkeypatch):
    """A judge function with set scores: duplicates keep their best score, empty completions and samples without
    a verdict are never kept, `--keep correct` / `best` with a judge keep by the rule / by rewards + judge."""
    from minigrpo.rollout.types import Rollout, SamplingParams
    from minigrpo.tasks.rewards import load_reward
    from minigrpo.tasks.sources import _to_example
    from minigrpo.tools import sample as sample_mod

    examples = [_to_example({"question": "Q", "answer": "#### 5"}, "row 0", "question", "answer")]
    texts = ["#### 5", "#### 5", "", "#### 4", "#### 3", "#### 5"]
    given = [0.9, None, 1.0, 1.0, None, 0.3]

    def fake_generate(backend, model, tok, prompts, params):
        z = torch.zeros(6, 1)
        return Rollout(z.long(), z.long(), z.long(), z + 1, torch.zeros(6, dtype=torch.bool), ["Q"] * 6, texts)

    def judge(prompts, completions, **kw):
        return list(given)

    monkeypatch.setattr(sample_mod, "generate", fake_generate)
    correctness = [("correctness", load_reward("correctness"), 1.0)]
    run = lambda keep, **kw: sample_mod.rejection_sample(None, None, ["Q"], examples, SamplingParams(n=6),  # noqa
                                                         correctness, keep=keep, judge=judge, **kw)
    rows, stats = run("judge", threshold=0.8)
    assert [(r["completion"], r["judge_score"]) for r in rows] == [("#### 5", 0.9), ("#### 4", 1.0)]
    assert stats["judge_accepted"] == 3 and stats["judge_failures"] == 2 and stats["kept"] == 2
    # ruled and judged: (0.9, right) (1.0 on "", wrong) (1.0, wrong) (0.3, right) -> 3 accepted, 1 of them right
    assert stats["judge_precision"] == 1 / 3 and stats["judge_recall"] == 1 / 2
    assert stats["judge_agreement_with_rule"] == 1 / 4 and stats["mean_pass_rate"] == 0.5
    rows, _ = run("correct")
    assert [(r["completion"], r["judge_score"]) for r in rows] == [("#### 5", 0.9)]  # the best of its copies
    rows, _ = run("best", best_k=2)  # correctness + judge: 1.9 ("#### 5"), then 1.3 ("#### 5" again)
    assert [(r["completion"], r["judge_score"]) for r in rows] == [("#### 5", 0.9), ("#### 5", 0.3)]


def test_sample_refuses_keep_correct_without_gold_answers_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from minigrpo import model as model_module
    from minigrpo.cli import main

    data = tmp_path / "open.jsonl"
    data.write_text(json.dumps({"question": "Write a haiku."}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(model_module, "load_model", no_model)
    assert main(["sample", "--model", "tiny-arith", "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "no 'answer' column (--keep correct compares each sample with its gold answer)" in capsys.readouterr().err


def test_sample_with_a_judge_from_the_command_line(tmp_path, capsys):
    """`minigrpo sample --judge`: the policy samples, the judge reads each completion, the kept rows carry the score
    it gives that completion (checked by asking the judge again, one completion at a time)."""
    from minigrpo.cli import main
    from minigrpo.tasks.model_rewards import Judge

    rubric = tmp_path / "rubric.txt"
    rubric.write_text("{answer}\n{question}")  # it reads the completion, then works the problem out: its `#### N`
    out = tmp_path / "kept.jsonl"
    argv = ["sample", "--model", "tiny-arith", "--data", "arith", "--limit", "6", "--n", "4", "--judge", str(ASSET),
            "--judge_rubric", str(rubric), "--judge_pattern", VERDICT.pattern, "--judge_max_tokens", "32",
            "--judge_threshold", "0.5", "--max_new_tokens", "32", "--out", str(out)]
    assert main(argv) == 0
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["samples"] == 24 and 0 < stats["kept"] == len(rows) <= stats["judge_accepted"] < 24
    judge = Judge(str(ASSET), rubric=str(rubric), pattern=VERDICT.pattern, max_tokens=32)
    assert [judge(["p"], [r["completion"]], question=[r["question"]])[0] for r in rows] == \
        [r["judge_score"] for r in rows]
    assert all(r["judge_score"] >= 0.5 for r in rows)
    assert stats["judge_threshold"] == 0.5 and 0 <= stats["judge_agreement_with_rule"] <= 1
    assert "judge: accepted=" in capsys.readouterr().out


def test_demo_full_runs_r1s_four_stages(tmp_path, monkeypatch):
    from minigrpo.tools import demo

    monkeypatch.setattr(demo, "BASE", demo.BASE | {"eval_limit": 20, "arith_train_size": 200})
    table = demo.run_demo(str(tmp_path / "demo"), scale=0.02, show_progress=False, full=True)
    assert [r["stage"] for r in table] == ["1. cold-start SFT", "2. GRPO (reward only)",
                                           "3a. judge: SFT on the rule's verdicts",
                                           "3b. rejection sampling (the judge)", "3c. SFT on the judge's picks",
                                           "4. GRPO, mixed set: rule + judge"]
    assert all("accuracy_4_steps" in r for r in table if r["accuracy"] is not None)
    mixed = [json.loads(line) for line in (tmp_path / "demo" / "4-mixed.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in mixed} == {"rule", "judge"}
    metrics = [json.loads(line) for line in
               (tmp_path / "demo" / "4-grpo-mixed" / "metrics.jsonl").read_text().splitlines()]
    assert any(isinstance(r.get("train/rewards/judge/mean"), float) and  # the judge gave verdicts, on its rows
               isinstance(r.get("train/rewards/correctness/mean"), float) for r in metrics)


def test_judge_data_is_balanced_and_on_rows_routes(tmp_path):
    from minigrpo.tasks.answers import is_correct
    from minigrpo.tools.demo import JUDGE_RUBRIC, judge_data, on_rows

    graded = [{"answer": f"#### {i}", "reference": "3", "right": i == 3} for i in range(10)]
    graded += [{"answer": "x #### 3", "reference": "3", "right": True}, {"answer": "#### 3", "reference": "3",
                                                                      "right": True}]  # a repeat: counted once
    assert judge_data(graded, tmp_path, test_fraction=0.25, near_misses=False) == {"train": 2, "test": 2}
    rows = [json.loads(line) for f in ("train", "test") for line in (tmp_path / f"{f}.jsonl").read_text().splitlines()]
    texts = {JUDGE_RUBRIC.format(answer=g["answer"], reference="3"): g["right"] for g in graded}
    assert sorted(texts[r["question"]] for r in rows) == [False, False, True, True]  # balanced: 2 right, 2 wrong
    assert all(r["answer"] == ("#### 10" if texts[r["question"]] else "#### 0") for r in rows)  # each its label
    counts = judge_data(graded, tmp_path / "near", test_fraction=0.25)  # + each train sample against a near miss
    rows = [json.loads(line) for line in (tmp_path / "near" / "train.jsonl").read_text().splitlines()]
    pairs = [r["question"].split("\n= ") for r in rows]
    assert counts["train"] == len(rows) > 2 and any(ref != "3 ?" for _, ref in pairs)
    assert all(r["answer"] == ("#### 10" if is_correct(a, ref.removesuffix(" ?")) else "#### 0")
               for r, (a, ref) in zip(rows, pairs))  # every label the rule's
    with pytest.raises(ValueError, match="all right or all wrong"):
        judge_data([g for g in graded if g["right"]], tmp_path / "one-sided")
    calls = []

    def reward(prompts, completions, answer, **kw):
        calls.append((completions, answer))
        return [float(len(c)) for c in completions]

    routed = on_rows(reward, "judge")
    assert routed(["p"] * 3, ["a", "bb", "ccc"], kind=["rule", "judge", "judge"], answer=["1", "2", "3"]) \
        == [None, 2.0, 3.0]
    assert calls == [(["bb", "ccc"], ["2", "3"])] and routed.__name__ == "reward"
    assert routed(["p"], ["a"], kind=["rule"], answer=["1"]) == [None] and len(calls) == 1

    async def served(prompts, completions, **kw):  # a server judge is async: so is its routed form
        return [0.5 for _ in completions]

    from minigrpo.tasks.rewards import score

    totals, _ = score([("judge", on_rows(served, "judge"), 1.0)], ["p"] * 2, ["a", "b"], {"kind": ["judge", "rule"]})
    assert totals == [0.5, None]
