"""The `hf` rollout backend: transformers' `generate`, the reference the engine is checked against."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigrpo.model import merged_lora
from minigrpo.rollout.types import Rollout, SamplingParams, encode_prompts, eos_token_ids, make_rollout


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             params: SamplingParams, merge_lora: bool = True) -> Rollout:
    """Sample `params.n` completions per prompt with transformers' `generate` (LoRA folded in while it runs,
    unless merge_lora is False)."""
    with merged_lora(model, merge_lora):
        return hf_generate(model, tokenizer, prompts, params)


@torch.no_grad()
def hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                params: SamplingParams) -> Rollout:
    """`params.n` completions per prompt from `model.generate`, as a Rollout."""
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
