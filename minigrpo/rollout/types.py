"""What every rollout backend shares: how to sample (`SamplingParams`), what comes back (`Rollout`), and the
helpers that build one from token ids.

A `Rollout` holds left-padded prompts, right-padded completions, the completion mask (tokens up to and
including the first EOS) and the decoded texts. Completions come in groups: the n samples of prompt i are
rows i*n ... i*n + n - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class Rollout:
    """A batch of B = num_prompts * n completions, each prompt's n samples in consecutive rows."""
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, C] right-padded after the first EOS
    completion_mask: torch.Tensor  # [B, C] float, 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    prompts: list[str]  # [B] prompt text of each completion
    completions: list[str]  # [B] decoded completion text, special tokens removed
    logprobs: torch.Tensor | None = None  # [B, C] sampled tokens' log-probs, when the backend gives them
    # (the engine's; what the sampler/trainer mismatch and stale-batch corrections read)

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


def make_rollout(tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, completion_ids: torch.Tensor, eos: list[int]) -> Rollout:
    """Assemble a Rollout from generated ids: mask, truncation flags, decoded texts."""
    cmask = completion_mask(completion_ids, eos)  # [B, C]
    has_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device)).any(1)
    # Decode only the masked-in tokens: text after the first EOS is padding, not part of the answer.
    lengths = cmask.sum(1).long().tolist()
    texts = tokenizer.batch_decode([row[:n_tok] for row, n_tok in zip(completion_ids.tolist(), lengths)],
                                   skip_special_tokens=True)
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
                   else torch.cat([pad(r.logprobs, C, 0.0, False) for r in parts]))


def select_rows(ro: Rollout, rows: list[int]) -> Rollout:
    """The Rollout restricted to `rows` (in that order)."""
    idx = torch.tensor(rows, dtype=torch.long)
    return Rollout(prompt_ids=ro.prompt_ids[idx], prompt_mask=ro.prompt_mask[idx],
                   completion_ids=ro.completion_ids[idx], completion_mask=ro.completion_mask[idx],
                   truncated=ro.truncated[idx], prompts=[ro.prompts[i] for i in rows],
                   completions=[ro.completions[i] for i in rows],
                   logprobs=None if ro.logprobs is None else ro.logprobs[idx])
