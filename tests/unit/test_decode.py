"""The engine's own decode step (rollout/decode.py): transformers' logits, generate's greedy tokens, on each
architecture it claims, and transformers' forward for every other one."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from minigrpo.compat import decoder_parts, enable_checkpointing
from minigrpo.rollout import decode, engine
from minigrpo.rollout.engine import engine_generate
from minigrpo.rollout.hf import hf_generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.arith import arith_rows
from minigrpo.tiny import arith_tokenizer

SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False)


def _model(kind: str, tok) -> torch.nn.Module:
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(3)
    if kind == "llama":  # SmolLM2's family; biases on, a head_dim of its own
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, **ids, attention_bias=True, mlp_bias=True, head_dim=32))
    elif kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, **ids))
    elif kind == "qwen3":  # RMSNorm over each query / key head
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, **ids, head_dim=16))
    else:
        model = MistralForCausalLM(MistralConfig(**SHAPE, **ids, sliding_window=None))
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a missed one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    head = torch.nn.Linear(SHAPE["hidden_size"], len(tok), bias=True)  # a bias keeps EOS away: long answers
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()[tok.eos_token_id] = -100.0
    model.lm_head = head
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    return model.eval()


def _prompts(tok, n=5):
    qs = [row["question"] for row in arith_rows("test", n)]
    qs[1] = qs[1][:12]  # left padding
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in qs]


def _force_layouts(monkeypatch, kv: str, products: str) -> list:
    """Make the engine choose these layouts (decode.kv_layout, decode.product_layout) whatever the sizes; the list
    it returns collects the KV cache kinds the engine made."""
    monkeypatch.setattr(decode, "EXPAND_BYTES", float("inf") if kv == "expanded" else -1)
    monkeypatch.setattr(decode, "CACHED_WEIGHT_BYTES", -1 if products == "packed" else float("inf"))
    made, make = [], engine.make_kv

    def recorded(*args):
        kv_cache = make(*args)
        made.append(type(kv_cache).__name__)
        return kv_cache

    monkeypatch.setattr(engine, "make_kv", recorded)
    return made


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("kv,products", [("shared", "packed"), ("expanded", "transposed"), ("shared", "transposed"),
                                         ("expanded", "packed")])
def test_native_step_gives_transformers_logits_and_generate_greedy_tokens(kind, kv, products, monkeypatch):
    """Each layout of the cache (a prompt's keys once for its samples, or copied to each) and of the products
    (MKL packed, a plain [in, out] copy): generate's greedy tokens, the hf path's samples."""
    tok = arith_tokenizer()
    model = _model(kind, tok)
    assert decoder_parts(model)[0] is not None, decoder_parts(model)[1]
    made = _force_layouts(monkeypatch, kv, products)
    steps, step = [], engine.NativeDecoder.step
    monkeypatch.setattr(engine.NativeDecoder, "step", lambda self, *a: (steps.append(1), step(self, *a))[1])
    greedy = SamplingParams(n=1, max_new_tokens=20, temperature=0.0)
    ours = engine_generate(model, tok, _prompts(tok), greedy)
    ref = engine_generate(model, tok, _prompts(tok), SamplingParams(n=1, max_new_tokens=20, temperature=0.0,
                                                                   engine_decode="hf"))
    assert len(steps) == ref.completion_ids.shape[1] - 1 == 19  # the native step ran (after the prefill's token)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_ids, hf_generate(model, tok, _prompts(tok), greedy).completion_ids)
    # sampled, rows ending at their own EOS (and leaving the batch): the same tokens from the same seeds, and
    # log-probs within float32 rounding of transformers'
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] = 2.0
    sampled = dict(n=3, max_new_tokens=16, temperature=1.0, seeds=[1, 2, 3, 4, 5])
    batch_sizes = []
    monkeypatch.setattr(engine.NativeDecoder, "step", lambda self, tokens, *a: (
        batch_sizes.append(len(tokens)), step(self, tokens, *a))[1])
    a = engine_generate(model, tok, _prompts(tok), SamplingParams(**sampled))
    assert batch_sizes[0] == 15 and min(batch_sizes) < 12  # rows left the batch on the way
    assert set(made) == {"ExpandedKV" if kv == "expanded" else "SharedPrefixKV"}
    b = engine_generate(model, tok, _prompts(tok), SamplingParams(**sampled, engine_decode="hf"))
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_other_architectures_decode_through_transformers():
    tok = arith_tokenizer()
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, sliding_window=8))
    parts, why = decoder_parts(gemma)
    assert parts is None and "gemma3" in why
    windowed = MistralForCausalLM(MistralConfig(**SHAPE, vocab_size=len(tok), sliding_window=8))
    assert decoder_parts(windowed) == (None, "sliding-window attention layers")
    qwen_windows = Qwen2Config(**SHAPE, vocab_size=len(tok), use_sliding_window=True, sliding_window=8,
                               max_window_layers=1)
    assert decoder_parts(Qwen2ForCausalLM(qwen_windows))[0] is None


def test_packed_plain_and_transformers_steps_agree():
    """engine_decode auto (fused products on copies of the weights, here a plain [in, out] layout: a tiny model),
    plain (F.linear per module) and hf: greedy tokens equal, sampled log-probs within float32 rounding."""
    tok = arith_tokenizer()
    model = _model("qwen2", tok)
    runs = {mode: engine_generate(model, tok, _prompts(tok), SamplingParams(n=1, max_new_tokens=12, temperature=0.0,
                                                                           engine_decode=mode))
            for mode in ("auto", "plain", "hf")}
    assert torch.equal(runs["auto"].completion_ids, runs["plain"].completion_ids)
    assert torch.equal(runs["auto"].completion_ids, runs["hf"].completion_ids)
    torch.testing.assert_close(runs["auto"].logprobs, runs["hf"].logprobs, atol=1e-5, rtol=0)


def test_products_of_every_layout_equal_the_modules_outputs():
    """decode.products: q/k/v (biases) fused into one product, as MKL packed GEMMs (a loud failure if this torch's
    CPU build loses the ops), a plain [in, out] copy, or each module; fewer rows than packed for are padded. A
    norm's weight (`scale`: folded into the [in, out] copy) and a residual give the modules' outputs at x * scale,
    plus the residual, on every layout; the modules' own weights are untouched."""
    from minigrpo.compat import mkl_packed_linear

    tok = arith_tokenizer()
    attn = _model("qwen2", tok).model.layers[0].self_attn
    modules = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(8, SHAPE["hidden_size"])
    scale = torch.rand(SHAPE["hidden_size"]) + 0.5
    before = [m.weight.clone() for m in modules]
    with torch.no_grad():
        expected = torch.cat([m(x) for m in modules], -1)
        at_scale = torch.cat([m(x * scale) for m in modules], -1)
        residual = torch.randn_like(expected)
        for layout in ("packed", "transposed", "plain"):
            fused = decode.products(modules, layout, rows=8)
            torch.testing.assert_close(fused(x), expected, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(fused(x[:3]), expected[:3], atol=1e-6, rtol=1e-6)  # rows have left
            scaled = decode.products(modules, layout, rows=8, scale=scale)
            torch.testing.assert_close(scaled(x), at_scale, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scaled(x[:3], residual[:3]), at_scale[:3] + residual[:3], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(m.weight, w) for m, w in zip(modules, before))
    assert mkl_packed_linear(attn.q_proj.weight, attn.q_proj.bias, 8) is not None
    assert mkl_packed_linear(torch.randn(4, 4, dtype=torch.bfloat16), None, 8) is None  # float32 only
    weights = [m.weight for m in modules]
    assert decode.product_layout(weights, fast=True) == "transposed"  # a tiny model stays in cache
    assert decode.product_layout(weights, fast=False) == "plain"  # engine_decode plain
    big = [torch.empty(4096, 4096)] * 2  # 128 MiB: streamed from memory
    assert decode.product_layout(big, fast=True) == "packed"
    assert decode.product_layout([w.to(torch.bfloat16) for w in big], fast=True) == "plain"


def test_copies_of_frozen_weights_are_kept_until_a_weight_changes():
    """decode.transposed_weights keeps the [in, out] copy of frozen weights (LoRA's base layers) between
    generations, and makes a new one when a weight, a bias or the norm's weight was changed in place or replaced,
    or trains (requires_grad); an entry goes when a tensor it was made from goes."""
    tok = arith_tokenizer()
    mlp = _model("llama", tok).model.layers[0].mlp
    modules = [mlp.gate_proj, mlp.up_proj]
    for m in modules:
        m.requires_grad_(False)
    x = torch.randn(4, SHAPE["hidden_size"])
    with torch.no_grad():
        first = decode.products(modules, "transposed", rows=4)
        assert decode.transposed_weights(modules, None)[0] is decode.transposed_weights(modules, None)[0]  # kept
        mlp.up_proj.weight.mul_(2.0)  # changed in place: a new copy with the new values
        torch.testing.assert_close(decode.products(modules, "transposed", rows=4)(x),
                                   torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(first(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1))
        mlp.gate_proj.weight = torch.nn.Parameter(torch.randn_like(mlp.gate_proj.weight), requires_grad=False)
        torch.testing.assert_close(decode.products(modules, "transposed", rows=4)(x),
                                   torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), atol=1e-6, rtol=1e-6)
        scale = torch.rand(SHAPE["hidden_size"])
        kept = decode.transposed_weights(modules, scale)[0]
        assert decode.transposed_weights(modules, scale)[0] is kept
        scale.mul_(2.0)  # the norm's weight changed: a new copy
        assert decode.transposed_weights(modules, scale)[0] is not kept
        torch.testing.assert_close(decode.products(modules, "transposed", rows=4, scale=scale)(x),
                                   torch.cat([mlp.gate_proj(x * scale), mlp.up_proj(x * scale)], -1),
                                   atol=1e-5, rtol=1e-5)
        assert mlp.gate_proj in decode._FROZEN
        del scale, kept  # a tensor an entry was made from dies: the entry with it
        assert mlp.gate_proj not in decode._FROZEN
        mlp.up_proj.requires_grad_(True)  # a trained weight: copied at every call, never kept
        assert decode.transposed_weights(modules, None)[0] is not decode.transposed_weights(modules, None)[0]
        with torch.inference_mode():  # inference tensors have no version counter: never kept either
            frozen = torch.nn.Linear(8, 8).requires_grad_(False)
        assert decode.transposed_weights([frozen], None)[0] is not decode.transposed_weights([frozen], None)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expanded_kv_attends_as_softmax_attention_over_each_rows_prompt_and_tokens(dtype, monkeypatch):
    """ExpandedKV.attend (float32 buffers: two batched products and a softmax over transposed keys; another dtype,
    as on a GPU: scaled_dot_product_attention) against attention written out: 2 prompts (one left-padded) x 3 rows,
    4 query heads over 2 KV heads, two steps, a row leaving between them."""
    monkeypatch.setattr(decode, "own_dtype", lambda keys: keys.dtype)
    sdpa, calls = decode.F.scaled_dot_product_attention, []
    monkeypatch.setattr(decode.F, "scaled_dot_product_attention", lambda *a, **k: (calls.append(1), sdpa(*a, **k))[1])
    torch.manual_seed(0)
    K, G, D, P, n = 2, 2, 8, 5, 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    prefill = [(torch.randn(2, K, P, D).to(dtype), torch.randn(2, K, P, D).to(dtype))]
    kv = decode.make_kv(prefill, mask, n, max_new_tokens=4)
    assert isinstance(kv, decode.ExpandedKV)
    keys = prefill[0][0].repeat_interleave(n, 0).float()
    values = prefill[0][1].repeat_interleave(n, 0).float()
    allowed = mask.repeat_interleave(n, 0).bool()
    rows = torch.arange(6)
    for step in range(2):
        if step == 1:  # row 4 has finished
            rows = torch.tensor([0, 1, 2, 3, 5])
            kv.batch_select_indices(torch.tensor([0, 1, 2, 3, 5]))
        b = len(rows)
        q, k, v = torch.randn(b, K * G, D).to(dtype), torch.randn(b, K, D).to(dtype), torch.randn(b, K, D).to(dtype)
        keys = torch.cat([keys[rows] if step else keys, k.float()[:, :, None]], 2)
        values = torch.cat([values[rows] if step else values, v.float()[:, :, None]], 2)
        allowed = torch.cat([allowed[rows] if step else allowed, torch.ones(b, 1, dtype=torch.bool)], 1)
        got = kv.attend(0, q, k, v, rows, scaling=0.3)
        kv.length += 1
        scores = torch.einsum("bkgd,bkld->bkgl", q.float().view(b, K, G, D), keys) * 0.3
        weights = torch.softmax(scores.masked_fill(~allowed[:, None, None], -torch.inf), -1)
        expected = torch.einsum("bkgl,bkld->bkgd", weights, values).reshape(b, K * G, D)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    assert len(calls) == (0 if dtype == torch.float32 else 2)  # bfloat16 buffers: softmax in float32 within SDPA


def test_kv_layout_copies_a_prompt_to_its_samples_only_when_small():
    # the random Qwen2 workload of `bench trl` (8 rows, 2 prompts of ~15 tokens, 2 KV heads of 32): 46 KB a layer
    assert decode.kv_layout(rows=8, prompts=2, prompt_len=15, kv_dim=64) == "expanded"
    # SmolLM2-135M on GSM8K (32 rows, 4 prompts of ~150 tokens, 3 KV heads of 64): 6.5 MB a layer
    assert decode.kv_layout(rows=32, prompts=4, prompt_len=150, kv_dim=192) == "shared"
    assert decode.kv_layout(rows=4, prompts=4, prompt_len=150, kv_dim=192) == "expanded"  # n = 1: no copy


def test_a_model_with_forward_hooks_decodes_through_transformers():
    """A hook that edits outputs runs only in transformers' forward: the engine then decodes through it."""
    tok = arith_tokenizer()
    model = _model("llama", tok)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 0)
    assert decoder_parts(model) == (None, "forward hooks on the model (they run only in transformers' forward)")
    handle.remove()
    assert decoder_parts(model)[0] is not None


def test_transformers_own_recording_hooks_do_not_turn_the_native_step_off():
    """transformers installs output-recording hooks on a model's first forward that asks for hidden states, and
    enable_input_require_grads (gradient checkpointing, k-bit training) one on the embeddings: both leave outputs
    alone, so the native step stays on (a training run's policy pass installs the first)."""
    tok = arith_tokenizer()
    model = _model("qwen2", tok)
    ids = torch.tensor([[3, 4, 5]])
    model(input_ids=ids, output_hidden_states=True)
    model.enable_input_require_grads()
    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
    assert {h.__name__ for h in hooks} == {"output_capturing_hook", "make_inputs_require_grads"}
    assert decoder_parts(model)[0] is not None


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_native_training_forward_gives_transformers_logprobs_and_gradients(kind, layout, monkeypatch):
    """policy_logprobs through decode.forward_hidden (the one-call layouts: plain rows with left padding, packed
    rows under a tree mask) against transformers' forward: log-probs and every weight's gradient."""
    from minigrpo import logprobs

    tok = arith_tokenizer()
    model = _model(kind, tok)
    with torch.no_grad():
        model.lm_head.bias[tok.eos_token_id] = 2.0  # completions of several lengths
    ro = engine_generate(model, tok, _prompts(tok, 3), SamplingParams(n=2, max_new_tokens=10, temperature=1.0,
                                                                     seeds=[1, 2, 3]))
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    C, mask = ro.completion_ids.shape[1], ro.completion_mask
    monkeypatch.setattr(logprobs, "logprob_layout", lambda *a: layout)
    model.train()
    results = []
    for native in (True, False):
        model.zero_grad()
        logp, entropy = logprobs.policy_logprobs(model, ids, attention, C, 0.9, group_size=2, native=native)
        ((logp * mask).sum() + (entropy * mask).sum()).backward()
        results.append((logp * mask, entropy * mask, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, ours_ent, ours_grads), (ref, ref_ent, ref_grads) = results
    assert logprobs._native(model) is not None  # the native forward ran
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_ent, ref_ent, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_the_native_training_forward_stands_aside():
    """transformers' forward runs under a strategy's wrapper, activation checkpointing, attention dropout in
    training, and for architectures the engine does not know."""
    from minigrpo import logprobs

    tok = arith_tokenizer()
    model = _model("qwen2", tok)
    assert logprobs._native(model) is not None
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert logprobs._native(wrapper) is None
    model.config.attention_dropout = 0.1
    assert logprobs._native(model.train()) is None and logprobs._native(model.eval()) is not None
    model.config.attention_dropout = 0.0
    enable_checkpointing(model)
    assert logprobs._native(model) is None
