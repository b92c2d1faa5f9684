"""minigrpo's rollout engine (`rollout_backend: engine`, the default): a sampler made for GRPO's groups.

Each prompt is prefilled once and its KV cache shared by its n samples (read once for them by the engine's own
decode step, rollout/decode.py, on Llama-family models; expanded to them and preallocated for the whole completion
under transformers' forward); rows that finish leave the batch; each prompt samples from its own seed, so what it
samples does not depend on the rest of the batch. Greedy decoding gives transformers' `generate` tokens
(tests/unit/test_engine.py, test_decode.py).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from minigrpo.compat import cache_kwargs, preallocate
from minigrpo.errors import NonFiniteError
from minigrpo.model import cast_weights, merged_lora
from minigrpo.rollout.decode import NativeDecoder, make_kv
from minigrpo.rollout.types import (
    Rollout,
    SamplingParams,
    encode_prompts,
    eos_token_ids,
    hits_stop,
    make_rollout,
    make_trajectories,
    stop_window,
)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] under softmax(logits / temperature). logits: [B, V].

    `u` [B]: each row's uniform number in (0, 1] for this step (`prompt_uniforms`: drawn from its prompt's seed, so
    what a prompt samples depends neither on the batch nor on when finished rows leave it); None: drawn from the
    global generator.

    Four passes over the vocabulary (max, shift, exp, cumulative sum): each row draws one u in (0, 1] and takes the
    first token whose cumulative weight reaches u * total (inverse-CDF sampling, exact; u > 0 and u * total <= total
    land on a token of positive probability); its log-prob is its shifted logit - log total. torch.multinomial
    draws one exponential per vocabulary entry instead: 6 ms a [8, 49152] block on one core, 14% of SmolLM2's
    decoding.

    top-k / top-p restrict what can be drawn; the returned log-prob stays the full tempered distribution's,
    the one the trainer computes (with top-p < 1 the sampler and the trained policy differ: see README).
    A row of NaN or +inf logits draws some token with a NaN or -inf log-prob (the caller checks and stops).
    """
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / params.temperature if params.temperature != 1 else logits
    top = scaled.amax(-1, keepdim=True)  # [B, 1]
    cdf = (scaled - top).exp_().cumsum_(-1)  # [B, V]: unnormalised
    log_total, full = cdf[:, -1:].log(), scaled
    if params.top_k > 0 or params.top_p < 1.0:
        if params.top_k > 0:
            kth = torch.topk(scaled, min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, -torch.inf)
        if params.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
            sorted_logits, order = torch.sort(scaled, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            drop = probs.cumsum(-1) - probs > params.top_p  # the first token is always kept
            scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
        cdf = torch.softmax(scaled, -1).cumsum_(-1)  # the restricted distribution's
    if u is None:
        u = 1 - torch.rand(cdf.shape[0], device=cdf.device)
    target = u[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target)[:, 0].clamp_(max=cdf.shape[-1] - 1)  # clamp: a NaN row only
    return tokens, (full.gather(-1, tokens[:, None]) - top - log_total)[:, 0]


def prompt_uniforms(seeds: list[int], n: int, steps: int, device: torch.device) -> torch.Tensor:
    """sample_tokens' numbers for every step of a generation [steps, prompts x n], in (0, 1]: each prompt's
    generator (seeded with its seed) draws n a step, one per row of the prompt, whether that row is still in the
    batch or not; drawn at once (the same numbers as step by step on the CPU: one pass of the generator, two calls
    fewer at each step)."""
    return 1 - torch.cat([torch.rand((steps, n), generator=torch.Generator(device=device).manual_seed(int(seed)),
                                     device=device) for seed in seeds], 1)


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             params: SamplingParams, merge_lora: bool = True) -> Rollout:
    """The `engine` backend: `engine_generate` with LoRA folded into the weights while it runs (faster decoding),
    unless merge_lora is False, and the weights in `params.weights_dtype` when it is set."""
    with merged_lora(model, merge_lora), cast_weights(model, params.weights_dtype):
        return engine_generate(model, tokenizer, prompts, params)


@torch.no_grad()
def engine_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    params: SamplingParams) -> Rollout:
    """minigrpo's rollout engine: each prompt is prefilled once and its KV cache shared by its n samples.

    Then one decode step per token for the batch, with per-sequence EOS and stop strings (`params.stop`: a row
    whose last tokens' text holds one has finished): once a quarter of the rows have finished they leave the
    batch (and its KV cache), and decoding stops when every sequence has finished.
    Positions follow the attention mask exactly as in `generate`, so greedy decoding gives generate's tokens.
    The sampled tokens' log-probs come back in `Rollout.logprobs`.

    Multi-turn (`params.turns`, agent/turns.py): when a row's assistant turn ends, its tools run (the calls of
    every row that ended a turn at this step, concurrently) and the rendered answer is fed to that row one token
    per decode step, extending its KV cache, while the other rows go on sampling; the row then starts its next
    turn. `params.max_new_tokens` bounds the whole trajectory.
    """
    ids, mask = encode_prompts(tokenizer, prompts, next(model.parameters()).device)  # [P, L]
    decoder = None if params.engine_decode == "hf" else NativeDecoder.of(
        model, rows=ids.shape[0] * params.n if params.engine_decode == "auto" else 0,
        positions=ids.shape[1] + params.max_new_tokens)[0]
    if decoder is None or decoder.calls_modules or decoder.angles is None or params.turns is not None:
        return _decode(model, tokenizer, prompts, params, ids, mask, decoder)
    # the native step with its angles tabled calls no module (whose hooks, a strategy's, or a rotary module's cache
    # could keep its tensors) and, without tools, no user code: it runs under inference mode, without autograd's
    # bookkeeping (version counters, view records): ~14% of a tiny model's decode step over no_grad. What it
    # returns is copied out, a few [B, C] tensors, for the trainer to use as any tensor.
    with torch.inference_mode():
        ro = _decode(model, tokenizer, prompts, params, ids, mask, decoder)
    return dataclasses.replace(ro, **{f.name: getattr(ro, f.name).clone() for f in dataclasses.fields(ro)
                                      if isinstance(getattr(ro, f.name), torch.Tensor)})


def _decode(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], params: SamplingParams,
            ids: torch.Tensor, mask: torch.Tensor, decoder: NativeDecoder | None) -> Rollout:
    """engine_generate from the encoded prompts (ids, mask: [P, L], left-padded), through `decoder` (None:
    transformers' forward)."""
    device = ids.device
    eos = torch.tensor(eos_token_ids(model, tokenizer), device=device)
    pad = tokenizer.pad_token_id
    # ---- prefill: once per prompt; the native step reads each prompt's keys and values once for its n samples, or
    # its own copy of a short prompt's; transformers' forward needs its cache expanded to them ----------------------
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    # modules run in eval mode (no dropout): transformers' forward, or layers the native step calls as modules
    # (unmerged LoRA); the native step's own products have no dropout, and switching costs ~1 ms a call
    was_training, switch = model.training, decoder is None or decoder.calls_modules
    if switch:
        model.eval()
    if decoder is not None:
        logits, prefill = decoder.prefill(ids, mask, position)
        if decoder.overflowed:
            raise NonFiniteError("the model's activations overflow float32 (its logits are meaningless) while "
                                 "generating: its weights are broken")
        kv = make_kv(prefill, mask, params.n, params.max_new_tokens)
        del prefill  # make_kv holds what it needs
    else:
        cache = DynamicCache(config=model.config)
        with_cache = cache_kwargs(model, cache)  # {"cache" or "past_key_values": cache}, as transformers names it
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, **with_cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        if params.n > 1:
            cache.batch_repeat_interleave(params.n)
        preallocate(cache, params.max_new_tokens)
        kv = cache
    logits = logits.repeat_interleave(params.n, 0)  # [B, V]
    P = ids.shape[1]
    mask = torch.cat([mask.repeat_interleave(params.n, 0),
                      mask.new_ones((mask.shape[0] * params.n, params.max_new_tokens))], 1)  # [B, P+T], sliced
    position = position[:, -1:].repeat_interleave(params.n, 0)  # [B, 1]
    B, T = logits.shape[0], params.max_new_tokens
    full_prompt_mask = mask[:, :P]
    tokens = torch.full((B, T), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, T), device=device)
    live = torch.arange(B, device=device)  # original row of each row still in the compute batch
    uniforms = None if params.seeds is None or params.temperature == 0 else prompt_uniforms(
        params.seeds, params.n, T, device)  # [T, B]; the live rows' columns once rows leave
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per compute-batch row
    window = stop_window(params.stop) if params.stop else 0
    episodes = None if params.turns is None else params.turns.begin(tokenizer, eos.tolist(), B)
    forced: list[list[int]] = [[] for _ in range(B)]  # multi-turn, per row: tokens still to feed (a tool's answer)
    turn_start, ends = [0] * B, [None] * B  # where its current turn began; its length, once over
    tool_mask = torch.zeros((B, T), device=device)
    # ---- decode ---------------------------------------------------------------------------------------
    steps = 0
    for t in range(T):
        next_tokens, next_logp = sample_tokens(logits, params, None if uniforms is None else uniforms[t])
        is_forced = None
        if episodes is not None:
            is_forced = torch.zeros_like(done)
            live_rows = live.tolist()
            fed = [j for j, r in enumerate(live_rows) if forced[r]]
            if fed:  # these rows take their tool answer's next token instead of a sample
                at = torch.tensor(fed, device=device)
                next_tokens[at] = torch.tensor([forced[live_rows[j]].pop(0) for j in fed], device=device)
                next_logp[at] = 0.0
                is_forced[at] = True
                tool_mask[live[at], t] = 1.0
        tokens[live, t] = torch.where(done, pad, next_tokens)
        logprobs[live, t] = torch.where(done, 0.0, next_logp)
        ended = torch.isin(next_tokens, eos) & ~done  # an assistant turn ended here
        if is_forced is not None:
            ended &= ~is_forced
        if params.stop:  # decode only the unfinished rows' last tokens: enough to hold a stop string just completed
            open_rows = (~done & ~ended if is_forced is None else ~done & ~is_forced & ~ended).nonzero()[:, 0]
            tails = tokens[live[open_rows], max(0, t + 1 - window):t + 1].tolist()
            if episodes is not None:  # only the current turn's tokens
                tails = [tail[max(0, len(tail) - (t + 1 - turn_start[r])):]
                         for tail, r in zip(tails, live[open_rows].tolist())]
            hit = torch.tensor(hits_stop(tokenizer, tails, params.stop), dtype=torch.bool, device=device)
            ended[open_rows[hit]] = True
        if episodes is None:
            done |= ended
        elif (turn_ended := ended.nonzero()[:, 0].tolist()):  # tools answer, or the trajectory is over
            rows = live[turn_ended].tolist()
            answers = episodes.end_turn(rows, [tokens[r, turn_start[r]:t + 1].tolist() for r in rows],
                                        [T - t - 1] * len(rows))
            for j, r, answer in zip(turn_ended, rows, answers):
                if answer is not None:
                    forced[r], turn_start[r] = list(answer), t + 1 + len(answer)
                else:  # the trajectory ends here
                    done[j], ends[r] = True, t + 1
        steps = t + 1
        # the step's one sync: how many rows have finished, and whether a row drew from NaN or +inf logits (garbage
        # with a NaN or -inf log-prob, which makes the sum non-finite: a drawn token's own log-prob is finite)
        finished, logp_sum = torch.stack([done.sum().to(next_logp.dtype), next_logp.sum()]).tolist()
        finished = int(finished)
        if not math.isfinite(logp_sum):
            raise NonFiniteError("the model's logits are NaN or inf while generating: its weights are broken")
        if finished == len(done) or t == T - 1:
            break
        if finished * 4 >= len(done):  # a quarter of the batch has finished: drop those rows
            keep = (~done).nonzero()[:, 0]
            live, done, mask, position = live[keep], done[keep], mask[keep], position[keep]
            kv.batch_select_indices(keep)
            next_tokens = next_tokens[keep]
            uniforms = None if uniforms is None else uniforms[:, keep]
        position = position + 1
        if decoder is not None:
            logits = decoder.step(next_tokens, position, live, kv)
        else:
            out = model(input_ids=next_tokens[:, None], attention_mask=mask[:, :P + t + 1], position_ids=position,
                        **with_cache, use_cache=True)
            logits = out.logits[:, -1]
    if switch:
        model.train(was_training)
    prompt_ids, prompt_mask = ids.repeat_interleave(params.n, 0), full_prompt_mask
    if episodes is not None:
        lengths = [steps if e is None else e for e in ends]
        truncated = [c or e is None for c, e in zip(episodes.cut, ends)]  # the budget ended it, not the model
        ro = make_trajectories(tokenizer, prompts, params.n, prompt_ids, prompt_mask, tokens, lengths, tool_mask,
                               truncated, episodes.finish())
        ro.logprobs = logprobs[:, :ro.completion_ids.shape[1]] * ro.generated_mask
        return ro
    ro = make_rollout(tokenizer, prompts, params.n, prompt_ids, prompt_mask, tokens[:, :steps], eos.tolist(),
                      params.stop)
    ro.logprobs = logprobs[:, :steps] * ro.completion_mask
    return ro
