"""The vLLM backend's parts that need no vLLM: the clear failure at start without it, the weights it pushes (merged
LoRA, under the checkpoint's names), the folder it starts from, and the Rollout built from vLLM's outputs. vLLM
itself runs in tests/with_vllm (its CPU build, in .venv-vllm: `pytest -m vllm`)."""

import copy
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minigrpo.cli import main
from minigrpo.config import Config, ConfigError, load_config
from minigrpo.model import load_model, merged_lora
from minigrpo.rollout.vllm import check, rollout_from_outputs, served_folder, vllm_weights

no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the failure without vLLM")


@no_vllm
def test_vllm_backend_fails_at_start_without_vllm(tmp_path, capsys):
    with pytest.raises(ConfigError, match="rollout_backend: vllm needs the vllm package.*setup_vllm.sh.*"
                                          "rollout_backend: engine"):
        check(Config(rollout_backend="vllm"))
    out = tmp_path / "run"
    assert main(["train", "--rollout_backend=vllm", f"--output_dir={out}"]) == 2
    assert "needs the vllm package" in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def _peft_model():
    model, tok = load_model(Config(use_peft=True, lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def test_vllm_weights_are_every_tensor_with_the_lora_layers_merged():
    model, _ = _peft_model()
    merged = copy.deepcopy(model).merge_and_unload().state_dict()  # peft's own merge, as the reference
    with merged_lora(model):
        sent = dict(vllm_weights(model))
    assert set(sent) == set(merged)  # every tensor, the tied LM head under its own name too (vLLM's is separate)
    assert "lm_head.weight" in sent and (
        sent["lm_head.weight"].data_ptr() == sent["model.embed_tokens.weight"].data_ptr())
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-6, rtol=1e-6)
    assert not any("lora" in name for name in sent)
    base = load_model(Config())[0].state_dict()  # the same seed: the weights before LoRA
    assert not any(torch.equal(sent[n], base[n]) for n in sent if "q_proj" in n)  # the adapted layers changed
    assert all(torch.equal(sent[n], base[n]) for n in sent if "norm" in n)


def test_the_adapter_push_sends_the_base_once_under_the_checkpoint_names():
    """vllm_lora_sync: adapter: the base weights (what vLLM serves the adapter on) are the model's before LoRA."""
    model, _ = _peft_model()
    sent = dict(vllm_weights(model, base_only=True))
    base = load_model(Config())[0].state_dict()  # the same seed: the weights before LoRA
    assert set(sent) == set(base)
    assert all(torch.equal(sent[n], base[n]) for n in sent)


def test_the_adapter_push_needs_lora():
    with pytest.raises(ConfigError, match="vllm_lora_sync: adapter.*use_peft"):
        load_config(None, {"rollout_backend": "vllm", "vllm_lora_sync": "adapter"}).validate_grpo()
    load_config(None, {"rollout_backend": "vllm", "vllm_lora_sync": "adapter", "use_peft": True}).validate_grpo()
    with pytest.raises(ConfigError, match="vllm_lora_sync.*'merged', 'adapter'"):
        load_config(None, {"vllm_lora_sync": "lora"})


def test_lora_that_cannot_be_merged_is_refused_by_name():
    model, _ = load_model(Config(use_peft=True, lora_r=4, lora_target_modules=["embed_tokens", "q_proj"]))
    with merged_lora(model), pytest.raises(ConfigError, match="could not be merged.*embed_tokens"):
        vllm_weights(model)


@pytest.mark.vllm
def test_vllm_refuses_a_4bit_base_at_start():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("the check reaches load_in_4bit once vLLM is importable (.venv-vllm: -m vllm)")
    with pytest.raises(ConfigError, match="load_in_4bit"):
        check(Config(rollout_backend="vllm", load_in_4bit=True, use_peft=True, device="cpu"))


def test_vllm_weights_of_a_full_model_are_its_state_dict():
    model, _ = load_model(Config())
    assert set(dict(vllm_weights(model))) == set(model.state_dict())


def test_the_served_folder_has_the_config_and_tokenizer_and_no_weights():
    from transformers import AutoConfig, AutoTokenizer

    model, tok = _peft_model()
    folder = served_folder(model, tok)
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == model.get_base_model().config.architectures
    assert config.hidden_size == model.get_base_model().config.hidden_size
    assert AutoTokenizer.from_pretrained(folder)("3+4").input_ids == tok("3+4").input_ids
    assert not any(p.name.endswith((".safetensors", ".bin")) for p in Path(folder).iterdir())
    # a model built in code has no `architectures` until saved: vLLM would serve the bare (embedding) model
    random_model, random_tok = load_model(Config(model="tiny-random"))
    assert AutoConfig.from_pretrained(served_folder(random_model, random_tok)).architectures == ["LlamaForCausalLM"]


def _completion(ids, why, logprobs=None):
    lps = None if logprobs is None else [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, logprobs)]
    return SimpleNamespace(token_ids=ids, finish_reason=why, logprobs=lps)


def test_rollout_from_vllm_outputs():
    _, tok = load_model(Config())
    eos, pad = tok.eos_token_id, tok.pad_token_id
    digits = tok("12", add_special_tokens=False).input_ids
    prompts = ["<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\n1<|im_end|>\n"]
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    lp = [-0.5] * 10
    groups = [[_completion(digits + [eos], "stop", lp), _completion(digits, "stop", lp)],  # EOS not returned
              [_completion(digits * 3, "length", lp), _completion([eos], "stop", lp)]]
    ro = rollout_from_outputs(tok, prompts, 2, prompt_ids, groups, [eos], pad, torch.device("cpu"))
    assert ro.prompts == [prompts[0]] * 2 + [prompts[1]] * 2  # the groups: prompt i's samples in rows 2i, 2i+1
    P = max(len(p) for p in prompt_ids)
    assert ro.prompt_ids.shape == (4, P) and ro.prompt_mask[2:].sum(1).tolist() == [len(prompt_ids[1])] * 2
    assert ro.prompt_ids[2, -len(prompt_ids[1]):].tolist() == prompt_ids[1]  # left-padded
    n = len(digits)
    assert ro.completion_mask.sum(1).tolist() == [n + 1, n + 1, 3 * n, 1]
    assert ro.truncated.tolist() == [False, False, True, False]
    assert ro.completions == ["12", "12", "121212", ""]
    # the sampled tokens' log-probs; the EOS vLLM did not return has none (NaN), padding 0
    assert ro.logprobs[0, :n + 1].tolist() == [-0.5] * (n + 1) and ro.logprobs[0, n + 1:].abs().sum() == 0
    assert ro.logprobs[1, :n].tolist() == [-0.5] * n and math.isnan(ro.logprobs[1, n].item())
    no_logprobs = [[_completion(digits, "length")] * 2] * 2
    assert rollout_from_outputs(tok, prompts, 2, prompt_ids, no_logprobs, [eos], pad,
                                torch.device("cpu")).logprobs is None


def test_rollout_backend_vllm_is_a_config_choice():
    assert load_config(None, {"rollout_backend": "vllm"}).rollout_backend == "vllm"
    with pytest.raises(ConfigError, match="rollout_backend.*vllm"):  # the error lists the choices
        load_config(None, {"rollout_backend": "sglang"})

