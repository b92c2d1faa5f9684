"""Log-probs of completions under the policy (and the reference): the training side of the forward pass.

`policy_logprobs` is what the loss needs: each completion token's log-prob and entropy at the sampling
temperature. It picks the cheapest exact layout for the batch (`logprob_layout`: packed rows under a tree
mask, a shared prompt prefix with an expanded KV cache, or plain rows) and runs the LM head on completion
tokens only, chunk by chunk (`chunked_head_logprobs`), so [batch, length, vocab] logits never exist.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from minigrpo.algo import token_logprobs
from minigrpo.compat import attn_implementation, cache_kwargs, checkpointing_enabled, decoder_parts, unwrap_model
from minigrpo.rollout.decode import forward_hidden

LOGPROB_CHUNK = 256  # completion tokens per LM-head chunk: [chunk, vocab] fp32 logits live at a time


def policy_logprobs(model: PreTrainedModel, rollout_ids: torch.Tensor, attention_mask: torch.Tensor,
                    num_completion: int, temperature: float, group_size: int = 1,
                    chunk_size: int = LOGPROB_CHUNK, target_mask: torch.Tensor | None = None,
                    native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the completion tokens under `model`. [B, P+C] -> [B, C], [B, C].

    Position ids follow the attention mask, as in `generate`, so left padding does not shift positions and
    the log-probs match the sampler's. With group_size = G > 1 (rows in blocks of G sharing a prompt) each
    prompt runs once, in the cheaper of two layouts (`logprob_layout`): "packed" puts a prompt and its G
    completions, without padding, in one row under a tree attention mask; "shared_prefix" runs the prompt
    once and expands its KV cache to the G padded completions.
    Only completion tokens (up to each EOS) reach the LM head, `chunk_size` of them at a time, each chunk
    recomputed in the backward pass: [batch, length, vocab] logits never exist at once. Positions after a
    completion's EOS get log-prob and entropy 0. All paths give the same values and gradients.
    `target_mask` [B, C] (multi-turn: the tokens the model sampled, `Rollout.generated_mask`) narrows the tokens
    that reach the LM head: tokens a tool added are context only, and get log-prob and entropy 0 too.
    `native`: the one-call layouts run the engine's own forward (rollout/decode.forward_hidden) where it applies
    (`_native`); False: always transformers' forward.
    """
    C = num_completion
    layout = logprob_layout(model, attention_mask, C, group_size)
    head = split_head(model) if chunk_size else None
    body = _body(model, head, native and layout != "shared_prefix")
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
        logp, entropy = token_logprobs(feats, targets, temperature)
        return (logp, entropy) if target_mask is None else (logp * target_mask, entropy * target_mask)
    heads = attention_mask[:, -C:].bool() if target_mask is None else target_mask.bool()
    return chunked_head_logprobs(head, feats, targets, heads, temperature, chunk_size,
                                 getattr(unwrap_model(model).config, "vocab_size", None))


def _body(model: PreTrainedModel, head: Callable | None, native: bool = False) -> Callable[..., torch.Tensor]:
    """body(keep, **inputs) -> the last `keep` positions' features: final hidden states (when the head is
    split off) or logits. One call of `model` itself, so wrappers (DDP, ...) see the forward; with `native` and a
    model `_native` accepts, the engine's own forward of its modules instead."""
    if head is None:
        return lambda keep, **kw: model(**kw, logits_to_keep=keep).logits
    parts = _native(model) if native else None
    if parts is not None:
        def body(keep: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 use_cache: bool = False) -> torch.Tensor:
            out = forward_hidden(parts, input_ids, attention_mask, position_ids)
            return out[:, -keep:] if keep else out
        return body
    return lambda keep, **kw: _last_hidden(model, keep, **kw)


def _native(model: PreTrainedModel) -> Any:
    """The decoder parts forward_hidden runs for `model` (compat.decoder_parts), or None where transformers'
    forward must run: a distributed strategy's wrapper (its hooks see only the model's own forward), activation
    checkpointing, attention dropout while training, or a model the engine's step does not know."""
    if hasattr(model, "module") or type(model).__name__.startswith("FSDP") or checkpointing_enabled(model):
        return None
    parts = decoder_parts(model)[0]
    return None if parts is None or (parts.attention_dropout and model.training) else parts


def _last_hidden(model: PreTrainedModel, keep: int, **inputs: Any) -> torch.Tensor:
    # logits_to_keep=1: the LM head runs on one position only; hidden_states[-1] is after the final norm
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
    return out[:, -keep:] if keep else out


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """head with head(model(x).hidden_states[-1]) == model(x).logits, or None when not so.

    Checked once per model on a short input and cached: families whose forward does more than the output
    projection (soft-capping, logit scales) are handled, and any other one falls back to full logits.
    """
    cached = _HEADS.get(model)
    if cached is not None:
        return cached or None
    lm = unwrap_model(model)
    result: Any = False
    try:
        projection = lm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        projection = None
    if projection is not None:
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
        try:
            with torch.no_grad():
                expected = lm(input_ids=ids, use_cache=False).logits.float()
                got = head(_last_hidden(lm, 0, input_ids=ids, use_cache=False)).float()
            if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-3):
                result = head
        except (AttributeError, TypeError, IndexError):  # a forward without hidden states: full logits
            pass
        model.train(was_training)
    _HEADS[model] = result  # by identity: a deep copy of the model (the reference) gets its own
    return result or None


def _head_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp, entropy = token_logprobs(head(hidden)[None], targets[None], temperature)
    return logp[0], entropy[0]


SMALL_LOGITS = 64 * 1024**2  # fp32 logits up to this size are computed in one piece (no recomputation)


def chunked_head_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                          temperature: float, chunk_size: int, vocab_size: int | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [B, C] of the masked-in targets from hidden states [B, C, H], chunk by chunk.

    With more than one chunk and gradients on, each chunk is checkpointed: its logits are freed after the
    forward and recomputed in the backward, so one chunk's [chunk, vocab] logits exist at a time. Logits
    of at most SMALL_LOGITS bytes in all (given `vocab_size`) are computed in one piece: nothing to save.
    """
    hid, tgt = hidden[mask], targets[mask]  # [N, H], [N]: only tokens up to each EOS
    if vocab_size and hid.shape[0] * vocab_size * 4 <= SMALL_LOGITS:
        chunk_size = max(hid.shape[0], 1)  # small enough at once: no recomputation
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


MAX_PACKED_MASK = 2 ** 26  # mask entries (per micro-batch) up to which packing is allowed: 256 MB in fp32
# a model call's fixed cost per layer, in FLOPs: transformers' forward bookkeeping (module calls, masks, LoRA
# wrappers) is ~0.8-1 ms a layer on this project's CPUs, ~4e7 FLOPs' time there. It decides for small models, where
# the shared prefix's second call costs more than the prompt tokens it saves (a 4-layer random Qwen2, prompts of
# ~10 tokens, G 4: 19.0 ms shared prefix vs 15.6 plain a reference pass); a larger model's tokens outweigh it
CALL_FLOPS_PER_LAYER = 4e7


def logprob_layout(model: PreTrainedModel, attention_mask: torch.Tensor, C: int, G: int) -> str:
    """'plain', 'shared_prefix' or 'packed': the layout with the fewest estimated FLOPs for this batch.

    Per layer, a token costs ~2 x the layer's weights (4h^2 + 3hm), an attended (query, key) pair ~4h and each
    model call CALL_FLOPS_PER_LAYER (the shared prefix makes two).
    Packed rows carry no completion padding but attend densely over prompt + all G completions; padded
    rows carry every completion to the longest one. Packing needs a custom 4D mask: sdpa or eager attention,
    no sliding window shorter than a packed row, and a mask of at most MAX_PACKED_MASK entries.
    """
    if G <= 1:
        return "plain"
    cfg = getattr(unwrap_model(model), "config", None)
    h = getattr(cfg, "hidden_size", 0) or 0
    m = getattr(cfg, "intermediate_size", 0) or 4 * h
    P = attention_mask.shape[1] - C
    n_groups = attention_mask.shape[0] // G
    lengths = attention_mask[:, P:].sum(1).clamp(min=1).view(n_groups, G).sum(1)  # packed completion tokens
    K = int(lengths.max())
    per_token, per_pair = 2 * (4 * h * h + 3 * h * m), 4 * h
    per_call = CALL_FLOPS_PER_LAYER * (getattr(cfg, "num_hidden_layers", 0) or 1)
    padded = (n_groups * P + G * n_groups * C) * per_token + n_groups * (P * P / 2 + G * C * (P + C / 2)) * per_pair \
        + 2 * per_call
    packed = n_groups * (P + K) * per_token + n_groups * (P + K) ** 2 * per_pair + per_call
    attn = attn_implementation(model)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    can_pack = (attn in ("sdpa", "eager") and (not window or P + K <= window)
                and n_groups * (P + K) ** 2 <= MAX_PACKED_MASK)
    # The shared prefix calls the model twice per pass: not under activation checkpointing, nor through an
    # distributed strategy's wrapper (DDP, DeepSpeed, FSDP expect one forward per backward). Then packing competes with
    # plain rows, each carrying its prompt.
    wrapped = hasattr(model, "module") or type(model).__name__.startswith("FSDP")
    shared = not (checkpointing_enabled(model) or wrapped)
    plain = n_groups * G * ((P + C) * per_token + (P + C) ** 2 / 2 * per_pair) + per_call
    best = min(([padded] if shared else []) + [plain] + ([packed] if can_pack else []))
    return "packed" if can_pack and packed == best else "shared_prefix" if shared and padded == best else "plain"


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
    with_cache = cache_kwargs(model, cache)
    first = body(1, input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position, **with_cache,
                 use_cache=True)  # [B/G, 1, *]: predicts the first completion token
    cache.batch_repeat_interleave(G)  # differentiable: gradients reach the prompt's computation
    position = position[:, -1:].repeat_interleave(G, 0) + torch.arange(1, C + 1, device=rollout_ids.device)
    rest = body(0, input_ids=rollout_ids[:, -C:], attention_mask=attention_mask, position_ids=position,
                **with_cache, use_cache=True)  # [B, C, *]
    return torch.cat([first.repeat_interleave(G, 0), rest[:, :-1]], 1)
