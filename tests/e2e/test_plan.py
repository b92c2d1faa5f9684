"""`minigrpo plan`: exact parts where they are exact, the verdict and suggestions, the CLI, the CPU fallbacks
for 4-bit weights and 8-bit optimizers, and the estimate against a measured run."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigrpo.cli import main
from minigrpo.config import Config, ConfigError
from minigrpo.model import load_model, make_optimizer_class
from minigrpo.tools.plan import GB, estimate, model_shape, plan


def test_shape_counts_match_the_real_model():
    cfg = Config(use_peft=True, lora_r=8)
    shape = model_shape(cfg)
    model, _ = load_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert shape.lora_params == trainable
    assert shape.params == total - trainable
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_dim, shape.vocab) == (4, 192, 512, 192, 115)


def test_shape_counts_a_layers_norms_and_query_width(tmp_path):
    """gemma-3 keeps four hidden-sized norms a layer and queries wider than hidden (4 x 256 over 640): its
    activations count both (Llama's two norms and hidden-wide queries are the baseline)."""
    from transformers import Gemma3TextConfig

    Gemma3TextConfig(vocab_size=1000, hidden_size=640, intermediate_size=2048, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=256).save_pretrained(tmp_path)
    gemma, llama = model_shape(Config(model=str(tmp_path))), model_shape(Config())
    assert (gemma.norms, gemma.q_dim, gemma.hidden) == (4, 1024, 640)
    assert (llama.norms, llama.q_dim, llama.hidden) == (2, 192, 192)
    wide = estimate(Config(model=str(tmp_path)), gemma, 40).parts["activations"]
    narrow = estimate(Config(model=str(tmp_path)), dataclasses.replace(gemma, norms=2, q_dim=640), 40).parts[
        "activations"]
    assert wide / narrow == pytest.approx(1 + (4 * 640 + 2 * 384) / (9 * 640 + 2 * 256 + 4 * 2048))


def test_parts_follow_the_options():
    shape = model_shape(Config())
    lora, full = Config(use_peft=True), Config()
    a, b = estimate(lora, shape, 40), estimate(full, shape, 40)
    assert a.parts["weights"] == b.parts["weights"] == shape.params * 4
    assert a.parts["optimizer"] == 2 * shape.lora_params * 4 and b.parts["optimizer"] == 2 * shape.params * 4
    assert a.parts["reference"] == 0 and b.parts["reference"] == 0  # beta = 0
    assert estimate(Config(beta=0.04), shape, 40).parts["reference"] == shape.params * 4  # a frozen copy
    assert estimate(Config(beta=0.04, use_peft=True), shape, 40).parts["reference"] == 0  # adapters off
    ckpt = estimate(Config(gradient_checkpointing=True), shape, 40)
    assert ckpt.parts["activations"] < b.parts["activations"] / 2
    assert estimate(Config(eval_limit=0), shape, 40).parts["evaluation"] == 0
    # 4-bit weights and 8-bit states count only where they exist: on CUDA
    q = Config(use_peft=True, load_in_4bit=True, optim="adamw_8bit")
    assert estimate(q, shape, 40, device="cpu").parts["weights"] == shape.params * 4
    gpu = estimate(q, shape, 40, device="cuda")
    assert gpu.parts["weights"] < shape.params * 4 * 0.5 and gpu.parts["optimizer"] == 2 * shape.lora_params
    assert gpu.parts["runtime"] == 0


def test_limit_verdict_and_suggestions():
    cfg = Config(beta=0.04)
    roomy = plan(cfg, "cpu", limit_gb=64)
    assert roomy.fits is True and roomy.suggestions == []
    tight_gb = (roomy.peak - roomy.parts["evaluation"] * 0.5) / GB
    tight = plan(cfg, "cpu", limit_gb=tight_gb)
    assert tight.fits is False and tight.suggestions
    assert any(peak <= tight.limit for _, peak in tight.suggestions)  # something makes it fit
    assert any("eval_batch_size" in flags for flags, _ in tight.suggestions)


def test_plan_cli(capsys):
    assert main(["plan", "--use_peft=true"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "weights" in out and "LoRA r=16" in out
    assert main(["plan", "--gpu_gb", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit in 0.0 GiB" in out
    assert main(["plan", "--gpu_gb=lots"]) == 2
    assert "--gpu_gb: expected a number" in capsys.readouterr().err


def test_4bit_and_8bit_fall_back_on_cpu_with_a_message(capsys):
    cfg = Config(use_peft=True, load_in_4bit=True, optim="paged_adamw_8bit", device="cpu")
    model, _ = load_model(cfg)
    out = capsys.readouterr().out
    assert "load_in_4bit: unavailable: bitsandbytes needs a CUDA device" in out and "load in float32" in out
    assert next(model.parameters()).dtype == torch.float32
    assert make_optimizer_class(cfg, torch.device("cpu")) is torch.optim.AdamW
    assert "optim paged_adamw_8bit: unavailable" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="load_in_4bit.*use_peft"):
        Config(load_in_4bit=True)


@pytest.mark.slow
def test_plan_within_25_percent_of_a_measured_run():
    script = Path(__file__).parents[2] / "scripts" / "check_plan.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tiny-arith LoRA" in out.stdout and "error" in out.stdout


def test_generation_counts_the_rollout_precision_the_shared_prompt_cache_and_the_packed_weights():
    """The rollout's memory by engine mode, from the model's shape (prompt length 40): the engine's own decode
    step (tiny-arith is a Llama) keeps each prompt's KV once and, on a CPU in float32, a packed copy of the linear
    weights, the completions' KV in float32 on a CPU; rollout_dtype bfloat16 instead holds a 2-byte copy of every
    weight and the prompts' KV in bfloat16 (no packing: MKL packs float32 only); transformers' forward
    (engine_decode hf) a KV cache per row; evaluation keeps the float32 weights."""
    from minigrpo.tools.plan import KV_FACTOR

    cfg = Config()
    shape = model_shape(cfg)
    assert shape.native
    rows, T, P, V = cfg.completions_per_step, cfg.max_completion_length, 40, shape.vocab
    kv_token, logits = shape.layers * 2 * shape.kv_dim * 4, rows * V * 4 * 3
    shared = KV_FACTOR * (rows * T + rows // cfg.num_generations * P) * kv_token
    packed = (shape.linear_layer_params + shape.lm_head_params) * 4
    base = estimate(cfg, shape, P)
    assert base.parts["generation"] == pytest.approx(shared + logits + packed)
    bf16 = estimate(Config(rollout_dtype="bfloat16"), shape, P)
    prompts_kv = KV_FACTOR * (rows // cfg.num_generations) * P * kv_token
    assert bf16.parts["generation"] == pytest.approx(shared - prompts_kv / 2 + logits + shape.params * 2)
    assert bf16.parts["evaluation"] == base.parts["evaluation"]
    hf = estimate(Config(engine_decode="hf"), shape, P)
    assert hf.parts["generation"] == pytest.approx(KV_FACTOR * rows * (P + T) * kv_token + logits)
    assert estimate(Config(engine_decode="plain"), shape, P).parts["generation"] == pytest.approx(shared + logits)
    assert estimate(cfg, shape, P, device="cuda").parts["generation"] == pytest.approx(shared + logits)
    assert estimate(Config(rollout_dtype="float32"), shape, P).parts == base.parts  # the weights' own dtype
