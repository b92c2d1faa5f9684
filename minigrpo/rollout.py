"""Rollout: turn prompts into groups of completions. Swap the engine here (`rollout_backend`).

Every backend returns a `Rollout`: left-padded prompts, right-padded completions, the completion mask
(tokens up to and including the first EOS), the decoded texts and the group of each completion.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from minigrpo.algo import completion_mask, token_logprobs
from minigrpo.model import merged_lora


@dataclass
class SamplingParams:
    """How to sample: n completions per prompt; temperature 0 means greedy."""
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Rollout:
    """A batch of B = num_prompts * n completions; completion i belongs to prompt group[i]."""
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] right-padded after the first EOS
    completion_mask: torch.Tensor  # [B, C] float, 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    prompts: list[str]  # [B] prompt text of each completion
    completions: list[str]  # [B] decoded completion text, special tokens removed
    group: list[int]  # [B] index of the prompt in the input list
    logprobs: torch.Tensor | None = None  # [B, C] sampled tokens' log-probs, when the backend gives them

    @property
    def num_completion_tokens(self) -> int:
        """Generated tokens that count (masked in): the unit of the tokens/s figure."""
        return int(self.completion_mask.sum().item())


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a completion: the tokenizer's eos and the generation config's (may be a list)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask. Chat templates already hold any BOS, so none is added again."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


@torch.no_grad()
def hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                params: SamplingParams) -> Rollout:
    """Sample `params.n` completions per prompt with transformers' `generate` (the reference backend)."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
    eos = eos_token_ids(model, tokenizer)
    greedy = params.temperature == 0
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
        top_k=None if greedy else params.top_k, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    completion_ids = out[:, ids.shape[1]:]
    return make_rollout(tokenizer, prompts, params.n, ids, mask, completion_ids, eos)


def make_rollout(tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, completion_ids: torch.Tensor, eos: list[int]) -> Rollout:
    """Assemble a Rollout from generated ids: mask, truncation flags, decoded texts, groups."""
    cmask = completion_mask(completion_ids, eos)  # [B, C]
    has_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device)).any(1)
    # Decode only the masked-in tokens: text after the first EOS is padding, not part of the answer.
    lengths = cmask.sum(1).long().tolist()
    texts = tokenizer.batch_decode([row[:n_tok] for row, n_tok in zip(completion_ids.tolist(), lengths)],
                                   skip_special_tokens=True)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=cmask, truncated=~has_eos, prompts=[p for p in prompts for _ in range(n)],
                   completions=texts, group=[i for i in range(len(prompts)) for _ in range(n)])


def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from several (prompts re-padded on the left, completions on the right; groups renumbered)."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    C = max(r.completion_ids.shape[1] for r in parts)

    def pad(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
        fill = x.new_full((x.shape[0], width - x.shape[1]), value)
        return torch.cat([fill, x] if left else [x, fill], 1)

    groups, offset = [], 0
    for r in parts:
        groups += [g + offset for g in r.group]
        offset += max(r.group) + 1
    return Rollout(prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in parts]),
                   prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
                   completion_ids=torch.cat([pad(r.completion_ids, C, pad_id, False) for r in parts]),
                   completion_mask=torch.cat([pad(r.completion_mask, C, 0, False) for r in parts]),
                   truncated=torch.cat([r.truncated for r in parts]),
                   prompts=[p for r in parts for p in r.prompts], completions=[c for r in parts for c in r.completions],
                   group=groups, logprobs=None if any(r.logprobs is None for r in parts)
                   else torch.cat([pad(r.logprobs, C, 0.0, False) for r in parts]))


def select_rows(ro: Rollout, rows: list[int]) -> Rollout:
    """The Rollout restricted to `rows` (in that order); groups keep their numbers."""
    idx = torch.tensor(rows, dtype=torch.long)
    return Rollout(prompt_ids=ro.prompt_ids[idx], prompt_mask=ro.prompt_mask[idx],
                   completion_ids=ro.completion_ids[idx], completion_mask=ro.completion_mask[idx],
                   truncated=ro.truncated[idx], prompts=[ro.prompts[i] for i in rows],
                   completions=[ro.completions[i] for i in rows], group=[ro.group[i] for i in rows],
                   logprobs=None if ro.logprobs is None else ro.logprobs[idx])


def sample_tokens(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] under softmax(logits / temperature). logits: [B, V].

    top-k / top-p restrict what can be drawn; the returned log-prob stays the full tempered distribution's,
    the one the trainer computes (with top-p < 1 the sampler and the trained policy differ: see README).
    """
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / params.temperature
    logp_all = torch.log_softmax(scaled, -1)  # [B, V]
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    if params.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > params.top_p  # the first token is always kept
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
    tokens = torch.multinomial(torch.softmax(scaled, -1), 1)[:, 0]
    return tokens, logp_all.gather(-1, tokens[:, None])[:, 0]


def preallocate(cache: object, extra: int) -> None:
    """Give every growing layer of a filled DynamicCache room for `extra` more tokens, allocated once.

    DynamicCache appends by concatenation, copying the whole cache at every decode step (O(T^2): 60% of
    the engine's time on the tiny model); a preallocated layer writes each new token in place.
    """
    cache.layers = [PreallocatedLayer.grown_from(layer, extra) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers allocated once; updates write in place."""

    @classmethod
    def grown_from(cls, layer: DynamicLayer, extra: int) -> DynamicLayer:
        new = cls()
        new.dtype, new.device, new.is_initialized = layer.dtype, layer.device, True
        B, H, L, D = layer.keys.shape
        new._k, new._v = layer.keys.new_empty(B, H, L + extra, D), layer.values.new_empty(B, H, L + extra, D)
        new._k[:, :, :L], new._v[:, :, :L], new._len = layer.keys, layer.values, L
        new.keys, new.values = new._k[:, :, :L], new._v[:, :, :L]
        return new

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the `indices` rows (finished sequences leave the batch)."""
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        self._k[:, :, self._len:self._len + n] = key_states
        self._v[:, :, self._len:self._len + n] = value_states
        self._len += n
        self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]
        return self.keys, self.values


@torch.no_grad()
def engine_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    params: SamplingParams) -> Rollout:
    """minigrpo's rollout engine: each prompt is prefilled once and its KV cache shared by its n samples.

    Then one decode step per token for the batch, with per-sequence EOS: once a quarter of the rows have
    finished they leave the batch (and its KV cache), and decoding stops when every sequence has finished.
    Positions follow the attention mask exactly as in `generate`, so greedy decoding gives generate's tokens.
    The sampled tokens' log-probs come back in `Rollout.logprobs`.
    """
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)  # [P, L]
    eos = torch.tensor(eos_token_ids(model, tokenizer), device=device)
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    # ---- prefill: once per prompt, then the cache is expanded to its n samples ---------------------------
    cache = DynamicCache(config=model.config)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    if params.n > 1:
        cache.batch_repeat_interleave(params.n)
    preallocate(cache, params.max_new_tokens)
    logits = out.logits[:, -1].repeat_interleave(params.n, 0)  # [B, V]
    P = ids.shape[1]
    mask = torch.cat([mask.repeat_interleave(params.n, 0),
                      mask.new_ones((mask.shape[0] * params.n, params.max_new_tokens))], 1)  # [B, P+T], sliced
    position = position[:, -1:].repeat_interleave(params.n, 0)  # [B, 1]
    B, T = logits.shape[0], params.max_new_tokens
    full_prompt_mask = mask[:, :P]
    tokens = torch.full((B, T), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, T), device=device)
    live = torch.arange(B, device=device)  # original row of each row still in the compute batch
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per compute-batch row
    # ---- decode ---------------------------------------------------------------------------------------
    steps = 0
    for t in range(T):
        next_tokens, next_logp = sample_tokens(logits, params)
        tokens[live, t] = torch.where(done, pad, next_tokens)
        logprobs[live, t] = torch.where(done, 0.0, next_logp)
        done |= torch.isin(next_tokens, eos)
        steps = t + 1
        if bool(done.all()) or t == T - 1:
            break
        if int(done.sum()) * 4 >= len(done):  # a quarter of the batch has finished: drop those rows
            keep = (~done).nonzero()[:, 0]
            live, done, mask, position = live[keep], done[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
            next_tokens = next_tokens[keep]
        position = position + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=mask[:, :P + t + 1], position_ids=position,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    model.train(was_training)
    prompt_ids, prompt_mask = ids.repeat_interleave(params.n, 0), full_prompt_mask
    ro = make_rollout(tokenizer, prompts, params.n, prompt_ids, prompt_mask, tokens[:, :steps], eos.tolist())
    ro.logprobs = logprobs[:, :steps] * ro.completion_mask
    return ro


def vllm_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  params: SamplingParams) -> Rollout:
    """vLLM, colocated (minigrpo/vllm_rollout.py; CUDA and the `gpu` extra): the run's engine, started at setup."""
    from minigrpo.vllm_rollout import vllm_generate as generate_with_vllm

    return generate_with_vllm(model, tokenizer, prompts, params)


BACKENDS: dict[str, Callable[..., Rollout]] = {"engine": engine_generate, "hf": hf_generate, "vllm": vllm_generate}
MERGES_ITSELF = {"vllm"}  # backends that fold LoRA into their own copy of the weights


def generate(backend: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             params: SamplingParams, merge_lora: bool = True) -> Rollout:
    """Dispatch to the configured rollout backend (LoRA folded into the weights while it runs, when asked)."""
    if backend not in BACKENDS:
        raise ValueError(f"rollout_backend: unknown {backend!r}; available: {list(BACKENDS)}")
    with merged_lora(model, merge_lora and backend not in MERGES_ITSELF):
        return BACKENDS[backend](model, tokenizer, prompts, params)


LOGPROB_CHUNK = 256  # completion tokens per LM-head chunk: [chunk, vocab] fp32 logits live at a time


def policy_logprobs(model: PreTrainedModel, rollout_ids: torch.Tensor, attention_mask: torch.Tensor,
                    num_completion: int, temperature: float, group_size: int = 1,
                    chunk_size: int = LOGPROB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the completion tokens under `model`. [B, P+C] -> [B, C], [B, C].

    Position ids follow the attention mask, as in `generate`, so left padding does not shift positions and
    the log-probs match the sampler's. With group_size = G > 1 (rows in blocks of G sharing a prompt) each
    prompt runs once, in the cheaper of two layouts (`logprob_layout`): "packed" puts a prompt and its G
    completions, without padding, in one row under a tree attention mask; "shared_prefix" runs the prompt
    once and expands its KV cache to the G padded completions.
    Only completion tokens (up to each EOS) reach the LM head, `chunk_size` of them at a time, each chunk
    recomputed in the backward pass: [batch, length, vocab] logits never exist at once. Positions after a
    completion's EOS get log-prob and entropy 0. All paths give the same values and gradients.
    """
    C = num_completion
    layout = logprob_layout(model, attention_mask, C, group_size)
    head = split_head(model) if chunk_size else None
    body = _body(model, head)
    if layout == "packed":
        feats = _packed_feats(body, model, rollout_ids, attention_mask, C, group_size)
    elif layout == "shared_prefix":
        feats = _shared_prefix_feats(body, model, rollout_ids, attention_mask, C, group_size)
    else:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        feats = body(C + 1, input_ids=rollout_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False)[:, :-1]  # [B, C, *]: position t predicts token t+1
    targets = rollout_ids[:, -C:]
    if head is None:  # feats are the logits
        return token_logprobs(feats, targets, temperature)
    return chunked_head_logprobs(head[1], feats, targets, attention_mask[:, -C:].bool(), temperature, chunk_size)


def _body(model: PreTrainedModel, head: tuple[Any, Callable] | None) -> Callable[..., torch.Tensor]:
    """body(keep, **inputs) -> the last `keep` positions' features: hidden states (head split) or logits."""
    if head is None:
        return lambda keep, **kw: model(**kw, logits_to_keep=keep).logits
    decoder = head[0]

    def hidden(keep: int, **inputs: Any) -> torch.Tensor:
        out = decoder(**inputs).last_hidden_state
        return out[:, -keep:] if keep else out

    return hidden


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_head(model: PreTrainedModel) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(decoder, head) with head(decoder(x).last_hidden_state) == model(x).logits, or None when not so.

    Checked once per model on a short input and cached on it: families whose forward does more than the
    output projection (soft-capping, logit scales) are handled, and any other one falls back to full logits.
    """
    cached = _HEADS.get(model)
    if cached is not None:
        return cached or None
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    result: Any = False
    try:
        decoder, projection = lm.get_decoder(), lm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = projection = None
    if decoder is not None and projection is not None:
        cap = getattr(lm.config, "final_logit_softcapping", None)
        scale = getattr(lm.config, "logit_scale", None)

        def head(hidden: torch.Tensor) -> torch.Tensor:
            logits = projection(hidden)
            if scale is not None:
                logits = logits * scale
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            return logits

        ids = (torch.arange(1, 6, device=next(model.parameters()).device) % lm.config.vocab_size)[None]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits.float()
            got = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        model.train(was_training)
        if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-3):
            result = (decoder, head)
    _HEADS[model] = result  # by identity: a deep copy of the model (the reference) gets its own
    return result or None


def _head_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp, entropy = token_logprobs(head(hidden)[None], targets[None], temperature)
    return logp[0], entropy[0]


def chunked_head_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                          temperature: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [B, C] of the masked-in targets from hidden states [B, C, H], chunk by chunk.

    With more than one chunk and gradients on, each chunk is checkpointed: its logits are freed after the
    forward and recomputed in the backward, so one chunk's [chunk, vocab] logits exist at a time.
    """
    hid, tgt = hidden[mask], targets[mask]  # [N, H], [N]: only tokens up to each EOS
    chunks = [slice(i, i + chunk_size) for i in range(0, hid.shape[0], chunk_size)] or [slice(0, 0)]
    recompute = len(chunks) > 1 and torch.is_grad_enabled() and hid.requires_grad
    outs = []
    for c in chunks:
        if recompute:
            outs.append(torch.utils.checkpoint.checkpoint(_head_logprobs, head, hid[c], tgt[c], temperature,
                                                          use_reentrant=False))
        else:
            outs.append(_head_logprobs(head, hid[c], tgt[c], temperature))
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, torch.cat([o[0] for o in outs]))
    entropy = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, torch.cat([o[1] for o in outs]))
    return logp, entropy


def _checkpointing(model: PreTrainedModel) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers renamed the flag in v5)."""
    flag = getattr(model, "is_activation_checkpointing", None)  # v5 name; the old one warns when read
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


MAX_PACKED_MASK = 2 ** 26  # mask entries (per micro-batch) up to which packing is allowed: 256 MB in fp32


def logprob_layout(model: PreTrainedModel, attention_mask: torch.Tensor, C: int, G: int) -> str:
    """'plain', 'shared_prefix' or 'packed': the layout with the fewest estimated FLOPs for this batch.

    Per layer, a token costs ~2 x the layer's weights (4h^2 + 3hm) and an attended (query, key) pair ~4h.
    Packed rows carry no completion padding but attend densely over prompt + all G completions; padded
    rows carry every completion to the longest one. Packing needs a custom 4D mask: sdpa or eager attention,
    no sliding window shorter than a packed row, and a mask of at most MAX_PACKED_MASK entries.
    """
    if G <= 1:
        return "plain"
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", 0) or 0
    m = getattr(cfg, "intermediate_size", 0) or 4 * h
    P = attention_mask.shape[1] - C
    n_groups = attention_mask.shape[0] // G
    lengths = attention_mask[:, P:].sum(1).clamp(min=1).view(n_groups, G).sum(1)  # packed completion tokens
    K = int(lengths.max())
    per_token, per_pair = 2 * (4 * h * h + 3 * h * m), 4 * h
    padded = (n_groups * P + G * n_groups * C) * per_token + n_groups * (P * P / 2 + G * C * (P + C / 2)) * per_pair
    packed = n_groups * (P + K) * per_token + n_groups * (P + K) ** 2 * per_pair
    attn = getattr(cfg, "_attn_implementation", None)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    can_pack = (attn in ("sdpa", "eager") and (not window or P + K <= window)
                and n_groups * (P + K) ** 2 <= MAX_PACKED_MASK)
    if can_pack and packed < padded:
        return "packed"
    return "plain" if _checkpointing(model) else "shared_prefix"


def _packed_feats(body: Callable[..., torch.Tensor], model: PreTrainedModel, rollout_ids: torch.Tensor,
                  attention_mask: torch.Tensor, C: int, G: int) -> torch.Tensor:
    """Features [B, C, *] (hidden states or logits) predicting the completion tokens, one packed row per group.

    Row g = [prompt (left-padded to P) | c_1 | c_2 | ... | c_G | pad], each c_i cut at its first EOS.
    Tree mask: a prompt token sees the prompt causally; a token of c_i sees the prompt and c_i causally.
    c_i's positions continue from the prompt's, as if it were alone. Tokens after a completion's EOS are
    not computed; their log-probs come out as those of position 0 and must stay masked (they are).
    """
    B, device = rollout_ids.shape[0], rollout_ids.device
    P, n_groups = rollout_ids.shape[1] - C, rollout_ids.shape[0] // G
    lengths = attention_mask[:, P:].sum(1).clamp(min=1).long()  # [B] tokens up to and including the EOS
    starts = P + torch.cumsum(lengths.view(n_groups, G), 1) - lengths.view(n_groups, G)  # [n, G] row offsets
    K = int(lengths.view(n_groups, G).sum(1).max())
    L = P + K
    prompt_mask = attention_mask[::G, :P]
    ids = rollout_ids.new_full((n_groups, L), int(rollout_ids[0, -1]))
    ids[:, :P] = rollout_ids[::G, :P]
    seg = torch.full((n_groups, L), -2, dtype=torch.long, device=device)  # -2 tail pad, -1 prompt pad, 0 prompt
    seg[:, :P] = torch.where(prompt_mask.bool(), 0, -1)
    position = torch.zeros((n_groups, L), dtype=torch.long, device=device)
    position[:, :P] = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    # Scatter every completion token to its packed column (one index op, no Python loop over rows).
    t = torch.arange(C, device=device)
    real = t[None, :] < lengths[:, None]  # [B, C]
    group = torch.arange(B, device=device) // G
    col = starts.view(B, 1) + t[None, :]  # [B, C]
    rows, cols = group[:, None].expand(B, C)[real], col[real]
    ids[rows, cols] = rollout_ids[:, P:][real]
    seg[rows, cols] = (torch.arange(B, device=device) % G + 1)[:, None].expand(B, C)[real]
    position[rows, cols] = (prompt_mask.sum(1)[group][:, None] + t[None, :]).expand(B, C)[real]
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=device)  # padding queries see themselves (no empty rows)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((n_groups, 1, L, L), dtype=dtype, device=device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)
    feats = body(K + 1, input_ids=ids, attention_mask=mask, position_ids=position,
                 use_cache=False)  # [n, K+1, *]: column j is packed position P-1+j
    # Token t of c_i is predicted by the prompt's last position (t = 0) or by c_i's token t-1.
    src = torch.where(t[None, :] == 0, 0, col - P).clamp(max=K).masked_fill(~real, 0)  # [B, C] into K+1
    return feats[group[:, None], src]


def _shared_prefix_feats(body: Callable[..., torch.Tensor], model: PreTrainedModel, rollout_ids: torch.Tensor,
                         attention_mask: torch.Tensor, C: int, G: int) -> torch.Tensor:
    """Features [B, C, *] (hidden states or logits) predicting the completion tokens, each group's prompt once."""
    prompt_ids, prompt_mask = rollout_ids[::G, :-C], attention_mask[::G, :-C]  # [B/G, P]
    cache = DynamicCache(config=model.config)
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = body(1, input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position, past_key_values=cache,
                 use_cache=True)  # [B/G, 1, *]: predicts the first completion token
    cache.batch_repeat_interleave(G)  # differentiable: gradients reach the prompt's computation
    position = position[:, -1:].repeat_interleave(G, 0) + torch.arange(1, C + 1, device=rollout_ids.device)
    rest = body(0, input_ids=rollout_ids[:, -C:], attention_mask=attention_mask, position_ids=position,
                past_key_values=cache, use_cache=True)  # [B, C, *]
    return torch.cat([first.repeat_interleave(G, 0), rest[:, :-1]], 1)
