"""Training-side fast paths: the packed (tree-mask) and shared-prefix log-prob layouts equal the plain one,
the layout choice, and generation with LoRA folded into the weights."""

import pytest
import torch

from minigrpo.algo import token_logprobs
from minigrpo.config import Config
from minigrpo.logprobs import _body, _packed_feats, _shared_prefix_feats, logprob_layout, policy_logprobs
from minigrpo.model import Reference, load_model, merged_lora
from minigrpo.rollout import generate
from minigrpo.rollout.engine import engine_generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.prompts import build_prompt
from minigrpo.tasks.sources import load_split


def _lora_arith(seed=0):
    cfg = Config(use_peft=True, lora_r=4, lora_alpha=8, seed=seed)
    model, tok = load_model(cfg)
    with torch.no_grad():  # non-zero B so the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = [build_prompt(tok, ex.question, cfg.template, cfg.system_prompt) for ex in load_split(cfg, "test", 5)]
    return model, tok, prompts


def _batch(model, tok, prompts, G, max_new_tokens):
    torch.manual_seed(0)
    ro = engine_generate(model, tok, prompts, SamplingParams(n=G, max_new_tokens=max_new_tokens))
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    return ro, ids, attention


def test_packed_and_shared_prefix_equal_the_plain_path_values_and_grads():
    model, tok, prompts = _lora_arith()
    G = 4
    ro, ids, attention = _batch(model, tok, prompts, G, max_new_tokens=20)
    C, mask = ro.completion_ids.shape[1], ro.completion_mask
    lengths = mask.sum(1)
    # The batch exercises what packing must get right: prompts of different lengths (left padding),
    # completions of different lengths, some cut at max_new_tokens (no EOS), and pad == eos.
    assert tok.pad_token_id == tok.eos_token_id
    assert len(set(ro.prompt_mask.sum(1).tolist())) > 1 and len(set(lengths.tolist())) > 2
    assert ro.truncated.any() and (~ro.truncated).any()
    model.train()
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    plain_logits = model(input_ids=ids, attention_mask=attention, position_ids=position).logits[:, -C - 1:-1]
    plain, plain_ent = token_logprobs(plain_logits, ids[:, -C:], 0.7)
    params = [p for p in model.parameters() if p.requires_grad]
    g_plain = torch.autograd.grad((plain * mask).sum(), params)
    for fn in (_packed_feats, _shared_prefix_feats):
        logp, ent = token_logprobs(fn(_body(model, None), model, ids, attention, C, G), ids[:, -C:], 0.7)
        torch.testing.assert_close(logp * mask, plain * mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent * mask, plain_ent * mask, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad((logp * mask).sum(), params), g_plain):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_layout_choice():
    model, tok, prompts = _lora_arith()
    ro, ids, attention = _batch(model, tok, prompts, 4, max_new_tokens=20)
    C = ro.completion_ids.shape[1]
    assert logprob_layout(model, attention, C, 1) == "plain"  # micro-batch not in whole groups
    assert logprob_layout(model, attention, C, 4) == "packed"  # short, uneven completions: no padding wins
    full = attention.clone()
    full[:, -C:] = 1
    long = torch.cat([full, torch.ones(full.shape[0], 200, dtype=full.dtype)], 1)
    assert logprob_layout(model, long, C + 200, 4) == "shared_prefix"  # every completion at the maximum
    # Through an engine's wrapper (one forward per backward) there is no shared prefix: with a long prompt,
    # packing still beats repeating the prompt in every row; with long completions, plain rows win.
    wrapper = torch.nn.Module()
    wrapper.module = model
    long_prompt = torch.cat([torch.ones(full.shape[0], 400, dtype=full.dtype), full], 1)
    assert logprob_layout(model, long_prompt, C, 4) == "shared_prefix"
    assert logprob_layout(wrapper, long_prompt, C, 4) == "packed"
    assert logprob_layout(wrapper, long, C + 200, 4) == "plain"
    model.config._attn_implementation = "flash_attention_2"  # no custom 4D masks there
    try:
        assert logprob_layout(model, attention, C, 4) == "shared_prefix"
    finally:
        model.config._attn_implementation = "sdpa"
    # policy_logprobs takes the chosen path and gives the plain path's values
    with torch.no_grad():
        auto, _ = policy_logprobs(model, ids, attention, C, 1.0, group_size=4)
        plain, _ = policy_logprobs(model, ids, attention, C, 1.0, group_size=1)
    torch.testing.assert_close(auto * ro.completion_mask, plain * ro.completion_mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("products", ["transposed", "packed"])
def test_merged_lora_generation_equals_the_adapter_path_and_restores_the_model(products, monkeypatch):
    """On each layout of the engine's products (decode.product_layout; packed forced here: a tiny model's own is
    transposed), LoRA folded into the weights and LoRA layers called as modules sample the same tokens."""
    from minigrpo.rollout import decode

    model, tok, prompts = _lora_arith()
    monkeypatch.setattr(decode, "CACHED_WEIGHT_BYTES", -1 if products == "packed" else float("inf"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules_before = dict(model.named_modules())
    greedy = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
    unmerged = generate("engine", model, tok, prompts, greedy, merge_lora=False)
    merged = generate("engine", model, tok, prompts, greedy, merge_lora=True)
    assert torch.equal(merged.completion_ids, unmerged.completion_ids)
    with torch.no_grad():  # what the adapters sample is not what the base model samples (the adapters were used)
        with model.disable_adapter():
            base = generate("engine", model, tok, prompts, greedy, merge_lora=False)
    assert not torch.equal(base.completion_ids, unmerged.completion_ids)
    torch.testing.assert_close(merged.logprobs, unmerged.logprobs, atol=1e-5, rtol=1e-5)
    # Inside, the adapted layers are plain Linear modules; the adapters do change the output.
    ids = unmerged.prompt_ids[:1]
    with torch.no_grad():
        with merged_lora(model):
            assert not any("lora" in n for n, _ in model.named_modules())
            inside = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(inside, adapted, atol=5e-4, rtol=1e-4)  # fp32 rounding of W + BA vs Wx + BAx
    assert (adapted - base).abs().max() > 1e-2
    # On exit: the same modules, and every weight bit-identical (no merge/unmerge rounding).
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(m is modules_before[n] for n, m in model.named_modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_lora_reference_is_the_base_model_and_the_adapters_come_back():
    """Reference.active with LoRA: inside, the model computes what peft's disable_adapter() gives (the base model);
    after it, even when the pass inside raised, the adapted model again."""
    model, tok, prompts = _lora_arith()
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.normal_()  # adapters matter
    ids = torch.tensor([[3, 4, 5, 6]])
    ref = Reference(model, use_peft=True)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with ref.active() as inside:
            assert inside is model
            assert torch.equal(inside(input_ids=ids).logits, base)
        assert torch.equal(model(input_ids=ids).logits, adapted)
        with pytest.raises(RuntimeError), ref.active():
            raise RuntimeError("a failed reference pass")
        assert torch.equal(model(input_ids=ids).logits, adapted)
    assert (adapted - base).abs().max() > 1e-2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the switch leaves what the optimizer updates alone
    with model.disable_adapter():  # and peft's own switch still works after it
        assert torch.equal(model(input_ids=ids).logits, base)


def test_unmerged_lora_with_dropout_samples_without_dropout():
    """Unmerged LoRA layers are called as modules by the engine's own step: in a training model (train mode, LoRA
    dropout 0.5) the engine still samples with dropout off (the same tokens from the same seeds every time, those of
    the merged weights) and leaves the model in train mode."""
    model, tok, prompts = _lora_arith()
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = torch.nn.Dropout(0.5)
    model.train()
    sampled = SamplingParams(n=2, max_new_tokens=12, temperature=1.0, seeds=[1, 2, 3, 4, 5])
    runs = [generate("engine", model, tok, prompts, sampled, merge_lora=False) for _ in range(2)]
    assert model.training
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    merged = generate("engine", model, tok, prompts, sampled, merge_lora=True)
    assert torch.equal(runs[0].completion_ids, merged.completion_ids)


def test_merged_lora_leaves_non_peft_models_alone():
    cfg = Config()
    model, _ = load_model(cfg)
    with merged_lora(model) as inside:
        assert inside is model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_path_under_gradient_checkpointing(checkpointing):
    cfg = Config(use_peft=True, lora_r=4, gradient_checkpointing=checkpointing)
    model, tok = load_model(cfg)
    prompts = [build_prompt(tok, ex.question, cfg.template, cfg.system_prompt) for ex in load_split(cfg, "test", 3)]
    ro, ids, attention = _batch(model, tok, prompts, 4, max_new_tokens=20)
    C = ro.completion_ids.shape[1]
    model.train()
    assert logprob_layout(model, attention, C, 4) == "packed"
    logp, _ = policy_logprobs(model, ids, attention, C, 1.0, group_size=4)
    (logp * ro.completion_mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
