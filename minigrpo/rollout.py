"""Rollout: turn prompts into groups of completions. Swap the engine here (`rollout_backend`).

Every backend returns a `Rollout`: left-padded prompts, right-padded completions, the completion mask
(tokens up to and including the first EOS), the decoded texts and the group of each completion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from minigrpo.algo import completion_mask
from minigrpo.compat import cache_kwargs, preallocate
from minigrpo.model import merged_lora


@dataclass
class SamplingParams:
    """How to sample: n completions per prompt; temperature 0 means greedy."""
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seeds: list[int] | None = None  # engine: one per prompt; its samples then depend on nothing else


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


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  groups: tuple[torch.Tensor, list[torch.Generator]] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] under softmax(logits / temperature). logits: [B, V].

    `groups` = (prompt index of each row, one generator per prompt), rows of a prompt contiguous: each
    prompt's rows draw from its own generator, so what a prompt samples does not depend on the batch.

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
    probs = torch.softmax(scaled, -1)
    if groups is None:
        tokens = torch.multinomial(probs, 1)[:, 0]
    else:
        ids, counts = torch.unique_consecutive(groups[0], return_counts=True)
        blocks = probs.split(counts.tolist())
        tokens = torch.cat([torch.multinomial(block, 1, generator=groups[1][g])[:, 0]
                            for g, block in zip(ids.tolist(), blocks)])
    return tokens, logp_all.gather(-1, tokens[:, None])[:, 0]


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
    with_cache = cache_kwargs(model, cache)  # {"cache" or "past_key_values": cache}, as this transformers names it
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, **with_cache, use_cache=True,
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
    gens = None if params.seeds is None or params.temperature == 0 else [
        torch.Generator(device=device).manual_seed(int(seed)) for seed in params.seeds]
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per compute-batch row
    # ---- decode ---------------------------------------------------------------------------------------
    steps = 0
    for t in range(T):
        next_tokens, next_logp = sample_tokens(logits, params, None if gens is None else (live // params.n, gens))
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
                    **with_cache, use_cache=True)
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
