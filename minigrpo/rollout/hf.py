"""The `hf` rollout backend: transformers' `generate`, the reference the engine is checked against."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from minigrpo.errors import NonFiniteError
from minigrpo.model import merged_lora
from minigrpo.rollout.types import (
    Rollout,
    SamplingParams,
    encode_prompts,
    eos_token_ids,
    hits_stop,
    make_rollout,
    stop_window,
)


class StopStrings(StoppingCriteria):
    """A row is done once the text of its completion's last tokens holds a stop string: the engine's test.

    Not generate's own `stop_strings=`: it matches across the prompt (a prompt ending in "\\n" and a completion
    starting with "\\n" hold "\\n\\n"), and it cannot read a vocabulary that does not spell its probe text
    (tiny-arith's word-level one: ValueError, transformers 5.24)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] | list[str], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width, self.window = tokenizer, stop, prompt_width, stop_window(stop)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window):].tolist()
        return torch.tensor(hits_stop(self.tokenizer, tails, self.stop), dtype=torch.bool, device=input_ids.device)


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             params: SamplingParams, merge_lora: bool = True) -> Rollout:
    """Sample `params.n` completions per prompt with transformers' `generate` (LoRA folded in while it runs,
    unless merge_lora is False)."""
    with merged_lora(model, merge_lora):
        return hf_generate(model, tokenizer, prompts, params)


@torch.no_grad()
def hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                params: SamplingParams) -> Rollout:
    """`params.n` completions per prompt from `model.generate`, as a Rollout (stop strings: `StopStrings`)."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
    eos = eos_token_ids(model, tokenizer)
    greedy = params.temperature == 0
    stops = StoppingCriteriaList([StopStrings(tokenizer, params.stop, ids.shape[1])] if params.stop else [])
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stops,
        )
    except RuntimeError as e:  # torch.multinomial's words for NaN / inf probabilities
        if "probability tensor contains" not in str(e):
            raise
        raise NonFiniteError("the model's logits are NaN or inf while generating: its weights are broken") from e
    model.train(was_training)
    completion_ids = out[:, ids.shape[1]:]
    return make_rollout(tokenizer, prompts, params.n, ids, mask, completion_ids, eos, params.stop)
