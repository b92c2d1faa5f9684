"""`minigrpo export`: the adapter reloads with peft to the trained model's logits, the merged model reloads
with transformers to the same logits, checkpoints export too, and bad input gets a clear error."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigrpo.cli import main
from minigrpo.config import Config, ConfigError
from minigrpo.model import load_model
from minigrpo.tools.export import export
from minigrpo.train import run_grpo


def _run(tmp_path, **kw):
    # tiny-arith on its task: rewards differ within groups, so the update does change the policy
    cfg = Config(**{"model": "tiny-arith", "use_peft": True} | kw, lora_r=4, num_generations=4,
                 per_device_train_batch_size=16, max_completion_length=32, learning_rate=2e-2, max_steps=2,
                 eval_limit=0, save_steps=1, output_dir=str(tmp_path / "run"))
    return cfg, run_grpo(cfg, show_progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_adapter_and_merged_exports_reload_to_the_trained_logits(tmp_path):
    cfg, run = _run(tmp_path)
    ids = run.tokenizer(run.train_prompts[:2], return_tensors="pt", padding=True).input_ids
    trained = _logits(run.model, ids)
    base, _ = load_model(Config(model="tiny-arith"))
    assert (trained - _logits(base, ids)).abs().max() > 1e-3  # training changed the policy

    adapter = export(run.run_dir, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(Config(model="tiny-arith"))[0], str(adapter))
    torch.testing.assert_close(_logits(reloaded, ids), trained, atol=1e-5, rtol=1e-5)

    assert main(["export", str(run.run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template and tok.pad_token == run.tokenizer.pad_token
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), trained, atol=1e-4, rtol=1e-4)

    first = export(run.run_dir, tmp_path / "ckpt1", checkpoint=1)  # the state after step 1 differs from the end
    at_step_1 = PeftModel.from_pretrained(load_model(Config(model="tiny-arith"))[0], str(first))
    assert (_logits(at_step_1, ids) - trained).abs().max() > 1e-6


def test_full_fine_tune_exports_a_standalone_model(tmp_path):
    cfg, run = _run(tmp_path, use_peft=False)
    ids = run.tokenizer(run.train_prompts[:1], return_tensors="pt").input_ids
    out = export(run.run_dir, tmp_path / "full")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(run.model, ids))


def test_export_errors_name_the_problem(tmp_path):
    _, run = _run(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint 7.*checkpoint-1"):
        export(run.run_dir, tmp_path / "x", checkpoint=7)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        export(run.run_dir, tmp_path / "busy")
    assert (tmp_path / "busy" / "f").read_text() == "keep me"  # nothing lost
    with pytest.raises(ConfigError, match="not a minigrpo run"):
        export(tmp_path, tmp_path / "y")
