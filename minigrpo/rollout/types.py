"""What every rollout backend shares: how to sample (`SamplingParams`), what comes back (`Rollout`), and the
helpers that build one from token ids.

A `Rollout` holds left-padded prompts, right-padded completions, the completion mask (tokens up to and
including the first EOS) and the decoded texts. Completions come in groups: the n samples of prompt i are
rows i*n ... i*n + n - 1.

Stop strings (`SamplingParams.stop`), the same in every backend: a completion ends with the token whose
decoded text completes a stop string (matched in the completion's own text, special tokens removed; never across
the prompt). That token is kept, as an EOS is: it is in the completion and in its mask, the text the rewards see
ends with the stop string (and whatever else that token spells), and the completion is not truncated. Backends
stop generating a row there (the engine and `hf` decode each unfinished row's last `stop_window` tokens per step);
`make_rollout` then finds that token from the text alone, so the convention has one definition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigrpo.algo import completion_mask


@dataclass
class SamplingParams:
    """How to sample: n completions per prompt; temperature 0 means greedy."""
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seeds: list[int] | None = None  # engine: one per prompt; its samples then depend on nothing else
    weights_dtype: str | None = None  # engine and hf: sample with the weights cast to this dtype (a temporary
    # copy: model.cast_weights), e.g. "bfloat16" (config rollout_dtype); None: as they are
    engine_decode: str = "auto"  # engine: "auto" decodes Llama-family models with its own step (rollout/decode.py;
    # float32 weights on a CPU as MKL packed GEMMs), "plain" with that step on the weights as they are, "hf" always
    # through transformers' forward (config engine_decode)
    stop: tuple[str, ...] | list[str] = ()  # texts that end a completion (kept in it, as EOS is: module docstring)
    # agent.turns.MultiTurn (not imported: agent/ imports the rollout helpers, directly or through the rewards)
    turns: Any = None  # multi-turn: tools answer the turns (agent/turns.py); max_new_tokens then
    # bounds the whole trajectory, tool messages included


@dataclass
class Rollout:
    """A batch of B = num_prompts * n completions, each prompt's n samples in consecutive rows."""
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] right-padded after the first EOS (or the token completing a stop string)
    completion_mask: torch.Tensor  # [B, C] float, 1 up to and including the first EOS (or that stop token)
    truncated: torch.Tensor  # [B] bool: no EOS nor stop string within max_new_tokens
    prompts: list[str]  # [B] prompt text of each completion
    completions: list[str]  # [B] decoded completion text, special tokens removed
    logprobs: torch.Tensor | None = None  # [B, C] sampled tokens' log-probs, when the backend gives them
    # (the engine's; what the sampler/trainer mismatch and stale-batch corrections read)
    tool_mask: torch.Tensor | None = None  # [B, C] float, multi-turn: 1 on tokens the tools / the chat template
    # added (tool messages, the next assistant header): in the context, never in the loss
    stats: dict[str, list[float]] | None = None  # multi-turn, per row: turns, tool_calls, tool_errors, tool_s

    @property
    def generated_mask(self) -> torch.Tensor:
        """[B, C] float: 1 on the tokens the model sampled (the completion less what tools added): the loss's."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * (1 - self.tool_mask)

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


def stop_window(stop: tuple[str, ...] | list[str]) -> int:
    """Tokens to decode to see a stop string the newest token completes: one per byte of the longest (a token
    spells at least one byte), and one before it (a tokenizer may drop the leading space of the first it decodes)."""
    return max(len(s.encode()) for s in stop) + 1


def hits_stop(tokenizer: PreTrainedTokenizerBase, tails: list[list[int]], stop: tuple[str, ...] | list[str],
              ) -> list[bool]:
    """Per row of token ids (a completion's last `stop_window` tokens): whether its text holds a stop string."""
    if not tails:  # batch_decode([]) is [""] in transformers 5.17, [] in 5.24
        return []
    return [any(s in text for s in stop) for text in tokenizer.batch_decode(tails, skip_special_tokens=True)]


def stop_length(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: tuple[str, ...] | list[str]) -> int | None:
    """Tokens of `ids` up to and including the one that completes the first stop string in the text, or None.

    A binary search on the text of the first k tokens (a text holds a stop string from that token on): log2(len)
    decodes, only for a completion whose text holds one."""
    def holds(k: int) -> bool:
        return hits_stop(tokenizer, [ids[:k]], stop)[0]

    if not ids or not holds(len(ids)):
        return None
    lo, hi = 1, len(ids)  # holds(hi); find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


def make_rollout(tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, completion_ids: torch.Tensor, eos: list[int],
                 stop: tuple[str, ...] | list[str] = ()) -> Rollout:
    """Assemble a Rollout from generated ids: mask, truncation flags, decoded texts. With `stop`, a completion
    whose text (before any EOS) holds a stop string ends with the token completing it (module docstring): the
    mask and text end there, the ids after it become padding and the completion is not truncated."""
    cmask = completion_mask(completion_ids, eos)  # [B, C]
    has_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device)).any(1)
    # Decode only the masked-in tokens: text after the first EOS is padding, not part of the answer.
    lengths = cmask.sum(1).long().tolist()
    rows = completion_ids.tolist()
    texts = tokenizer.batch_decode([row[:n_tok] for row, n_tok in zip(rows, lengths)], skip_special_tokens=True)
    stopped = [False] * len(rows)
    if stop:
        for i, text in enumerate(texts):
            if any(s in text for s in stop):
                lengths[i] = stop_length(tokenizer, rows[i][:lengths[i]], stop)
                texts[i] = tokenizer.decode(rows[i][:lengths[i]], skip_special_tokens=True)
                stopped[i] = True
        if any(stopped):
            ends = torch.tensor(lengths, device=completion_ids.device)  # [B]
            cmask = (torch.arange(completion_ids.shape[1], device=completion_ids.device)[None, :]
                     < ends[:, None]).float()  # [B, C]
            is_stopped = torch.tensor(stopped, device=completion_ids.device)
            completion_ids = completion_ids.masked_fill(is_stopped[:, None] & (cmask == 0), tokenizer.pad_token_id)
            has_eos = has_eos | is_stopped
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=cmask, truncated=~has_eos, prompts=[p for p in prompts for _ in range(n)],
                   completions=texts)


def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from several (prompts re-padded on the left, completions on the right)."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    C = max(r.completion_ids.shape[1] for r in parts)

    def pad(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
        fill = x.new_full((x.shape[0], width - x.shape[1]), value)
        return torch.cat([fill, x] if left else [x, fill], 1)

    return Rollout(prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in parts]),
                   prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
                   completion_ids=torch.cat([pad(r.completion_ids, C, pad_id, False) for r in parts]),
                   completion_mask=torch.cat([pad(r.completion_mask, C, 0, False) for r in parts]),
                   truncated=torch.cat([r.truncated for r in parts]),
                   prompts=[p for r in parts for p in r.prompts], completions=[c for r in parts for c in r.completions],
                   logprobs=None if any(r.logprobs is None for r in parts)
                   else torch.cat([pad(r.logprobs, C, 0.0, False) for r in parts]),
                   tool_mask=None if all(r.tool_mask is None for r in parts)
                   else torch.cat([pad(r.tool_mask if r.tool_mask is not None else torch.zeros_like(r.completion_mask),
                                       C, 0.0, False) for r in parts]),
                   stats=None if any(r.stats is None for r in parts)
                   else {k: [v for r in parts for v in r.stats[k]] for k in parts[0].stats})


def select_rows(ro: Rollout, rows: list[int]) -> Rollout:
    """The Rollout restricted to `rows` (in that order)."""
    idx = torch.tensor(rows, dtype=torch.long)
    return Rollout(prompt_ids=ro.prompt_ids[idx], prompt_mask=ro.prompt_mask[idx],
                   completion_ids=ro.completion_ids[idx], completion_mask=ro.completion_mask[idx],
                   truncated=ro.truncated[idx], prompts=[ro.prompts[i] for i in rows],
                   completions=[ro.completions[i] for i in rows],
                   logprobs=None if ro.logprobs is None else ro.logprobs[idx],
                   tool_mask=None if ro.tool_mask is None else ro.tool_mask[idx],
                   stats=None if ro.stats is None else {k: [v[i] for i in rows] for k, v in ro.stats.items()})


def make_trajectories(tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int, prompt_ids: torch.Tensor,
                      prompt_mask: torch.Tensor, tokens: torch.Tensor, lengths: list[int], tool_mask: torch.Tensor,
                      truncated: list[bool], stats: dict[str, list[float]]) -> Rollout:
    """A multi-turn Rollout: row i's trajectory is tokens[i, :lengths[i]] (its turns and what tools added in
    between, `tool_mask`); its text, the whole trajectory's, is what the rewards see."""
    C = max(lengths, default=0)
    ends = torch.tensor(lengths, device=tokens.device)
    cmask = (torch.arange(C, device=tokens.device)[None, :] < ends[:, None]).float()  # [B, C]
    rows = tokens[:, :C].tolist()
    texts = tokenizer.batch_decode([row[:k] for row, k in zip(rows, lengths)], skip_special_tokens=True)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                   completion_ids=tokens[:, :C].masked_fill(cmask == 0, tokenizer.pad_token_id),
                   completion_mask=cmask, truncated=torch.tensor(truncated, device=tokens.device),
                   prompts=[p for p in prompts for _ in range(n)], completions=texts,
                   tool_mask=tool_mask[:, :C] * cmask, stats=stats)


# What a backend's `sample` gives for each row it was asked for: the new tokens, and their log-probs (or None).
Sampled = tuple[list[int], list[float] | None]


def turn_by_turn(tokenizer: PreTrainedTokenizerBase, prompts: list[str], params: SamplingParams,
                 prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, eos: list[int],
                 sample: Callable[[list[int], list[list[int]], list[int]], list[Sampled]]) -> Rollout:
    """A multi-turn rollout made one assistant turn at a time (agent/turns.py): `sample(rows, contexts, room)`
    generates each row still going (`rows`: their indices) from its whole conversation so far (prompt, earlier
    turns, tool answers: token ids) with at most `room` new tokens, stopping at an EOS or a stop string; the
    turns end there, the episodes answer them, and the rows with an answer go on. The `hf` backend's reference
    loop and vLLM's (which caches the shared prefix itself); the engine extends each row's KV cache in place
    instead. The sampled tokens' log-probs come
    back in `Rollout.logprobs` when `sample` gives them (0 on the tool answers' tokens, which are not sampled)."""
    B, T = prompt_ids.shape[0], params.max_new_tokens
    episodes = params.turns.begin(tokenizer, eos, B)
    prompt_rows = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
    trajectory: list[list[int]] = [[] for _ in range(B)]
    from_tools: list[list[int]] = [[] for _ in range(B)]  # 1 where a token came from a tool answer
    logps: list[list[float]] = [[] for _ in range(B)]
    going, finished, known = list(range(B)), [False] * B, True  # finished: the model ended it (not the budget)
    while going:
        outs = sample(going, [prompt_rows[r] + trajectory[r] for r in going], [T - len(trajectory[r]) for r in going])
        ended_rows, turns = [], []
        for r, (new, lps) in zip(going, outs, strict=True):
            new = new[:T - len(trajectory[r])]  # this row's budget
            end = next((i + 1 for i, tok in enumerate(new) if tok in eos), None)
            if params.stop:
                at = stop_length(tokenizer, new[:end] if end else new, params.stop)
                end = at if at is not None else end
            turn = new[:end] if end else new
            trajectory[r] += turn
            from_tools[r] += [0] * len(turn)
            known = known and lps is not None
            logps[r] += list(lps or [])[:len(turn)]
            if end:
                ended_rows.append(r)
                turns.append(turn)
        answers = episodes.end_turn(ended_rows, turns, [T - len(trajectory[r]) for r in ended_rows]) \
            if ended_rows else []
        going = []
        for r, answer in zip(ended_rows, answers):
            if answer is not None:
                trajectory[r] += answer
                from_tools[r] += [1] * len(answer)
                logps[r] += [0.0] * len(answer)
                going.append(r)
            else:
                finished[r] = not episodes.cut[r]
    lengths = [len(x) for x in trajectory]
    C, device, pad = max(lengths, default=0), prompt_ids.device, tokenizer.pad_token_id
    tokens = torch.tensor([x + [pad] * (C - len(x)) for x in trajectory], device=device).reshape(B, C)
    tool_mask = torch.tensor([x + [0] * (C - len(x)) for x in from_tools], device=device, dtype=torch.float)
    ro = make_trajectories(tokenizer, prompts, params.n, prompt_ids, prompt_mask, tokens, lengths,
                           tool_mask.reshape(B, C), [not f for f in finished], episodes.finish())
    if known:
        ro.logprobs = torch.tensor([x + [0.0] * (C - len(x)) for x in logps], device=device).reshape(B, C)
    return ro
