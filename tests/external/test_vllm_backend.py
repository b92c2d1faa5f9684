"""The vLLM backend's CPU-testable parts: the clear failure at start without CUDA, the weights it would
push (merged LoRA, under vLLM's names), and the Rollout built from vLLM's outputs. vLLM itself runs on a GPU
only (see BENCHMARKS.md for the GPU runs)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from minigrpo.cli import main
from minigrpo.config import Config, ConfigError, load_config
from minigrpo.model import load_model, merged_lora
from minigrpo.rollout.vllm import check, rollout_from_outputs, vllm_weights

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")


@needs_no_cuda
def test_vllm_backend_fails_at_start_without_cuda(tmp_path, capsys):
    with pytest.raises(ConfigError, match="rollout_backend: vllm needs a CUDA GPU.*rollout_backend: engine"):
        check(Config(rollout_backend="vllm"))
    out = tmp_path / "run"
    assert main(["train", "--rollout_backend=vllm", f"--output_dir={out}"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def _peft_model():
    model, tok = load_model(Config(use_peft=True, lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def test_vllm_weights_are_the_merged_adapted_layers_under_base_names():
    model, _ = _peft_model()
    merged = copy.deepcopy(model).merge_and_unload().state_dict()  # peft's own merge, as the reference
    with merged_lora(model):
        adapted = dict(vllm_weights(model, only_adapted=True))
        everything = dict(vllm_weights(model, only_adapted=False))
    from peft.tuners.lora import LoraLayer

    lora_layers = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(adapted) == sorted(f"{n}.weight" for n in lora_layers)
    assert len(adapted) == 4 * 7  # 4 layers x the 7 Linear layers of each (q/k/v/o, gate/up/down)
    for name, tensor in adapted.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-6, rtol=1e-6)
    assert set(everything) == set(merged) - {"lm_head.weight"}  # tied to the embeddings: sent once
    assert not any("lora" in name for name in everything)


def test_vllm_weights_of_a_full_model_are_its_state_dict():
    model, _ = load_model(Config())
    names = dict(vllm_weights(model, only_adapted=False))
    assert set(names) == {n for n, _ in model.named_parameters()}


def _out(*completions):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=why) for ids, why in completions])


def test_rollout_from_vllm_outputs():
    _, tok = load_model(Config())
    eos, pad = tok.eos_token_id, tok.pad_token_id
    digits = tok("12", add_special_tokens=False).input_ids
    prompts = ["<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\n1<|im_end|>\n"]
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    outputs = [_out((digits + [eos], "stop"), (digits, "stop")),  # the second stopped on EOS without returning it
               _out((digits * 3, "length"), ([eos], "stop"))]
    ro = rollout_from_outputs(tok, prompts, 2, prompt_ids, outputs, [eos], pad, torch.device("cpu"))
    assert ro.prompts == [prompts[0]] * 2 + [prompts[1]] * 2  # the groups: prompt i's samples in rows 2i, 2i+1
    P = max(len(p) for p in prompt_ids)
    assert ro.prompt_ids.shape == (4, P) and ro.prompt_mask[2:].sum(1).tolist() == [len(prompt_ids[1])] * 2
    assert ro.prompt_ids[2, -len(prompt_ids[1]):].tolist() == prompt_ids[1]  # left-padded
    assert ro.completion_mask.sum(1).tolist() == [len(digits) + 1, len(digits) + 1, 3 * len(digits), 1]
    assert ro.truncated.tolist() == [False, False, True, False]
    assert ro.completions == ["12", "12", "121212", ""]


def test_rollout_backend_vllm_is_a_config_choice():
    assert load_config(None, {"rollout_backend": "vllm"}).rollout_backend == "vllm"
    with pytest.raises(ConfigError, match="rollout_backend.*vllm"):  # the error lists the choices
        load_config(None, {"rollout_backend": "sglang"})

