"""The `hf` rollout backend: transformers' `generate`, the reference the engine is checked against."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from minigrpo.errors import NonFiniteError
from minigrpo.model import cast_weights, merged_lora
from minigrpo.rollout.types import (
    Rollout,
    Sampled,
    SamplingParams,
    encode_prompts,
    eos_token_ids,
    hits_stop,
    make_rollout,
    stop_window,
    turn_by_turn,
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
    unless merge_lora is False; the weights in `params.weights_dtype` when it is set)."""
    with merged_lora(model, merge_lora), cast_weights(model, params.weights_dtype):
        return hf_generate(model, tokenizer, prompts, params)


@torch.no_grad()
def hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                params: SamplingParams) -> Rollout:
    """`params.n` completions per prompt from `model.generate`, as a Rollout (stop strings: `StopStrings`;
    multi-turn: `hf_multi_turn`)."""
    if params.turns is not None:
        return hf_multi_turn(model, tokenizer, prompts, params)
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


@torch.no_grad()
def hf_multi_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  params: SamplingParams) -> Rollout:
    """The multi-turn reference (agent/turns.py): one `generate` call per turn for the rows still going, each
    re-reading its whole conversation (prompt, earlier turns, tool answers) from scratch (`turn_by_turn`), the
    simple way the engine's cache-extending loop is checked against. Greedy, both give the same trajectories."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
    eos, pad, greedy = eos_token_ids(model, tokenizer), tokenizer.pad_token_id, params.temperature == 0

    def sample(rows: list[int], contexts: list[list[int]], room: list[int]) -> list[Sampled]:
        width = max(map(len, contexts))
        batch = torch.tensor([[pad] * (width - len(x)) + x for x in contexts], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in contexts], device=device)
        stops = StoppingCriteriaList([StopStrings(tokenizer, params.stop, width)] if params.stop else [])
        try:
            out = model.generate(
                input_ids=batch, attention_mask=attention, max_new_tokens=max(room), do_sample=not greedy,
                temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
                top_k=None if greedy else params.top_k, eos_token_id=eos, pad_token_id=pad, stopping_criteria=stops)
        except RuntimeError as e:  # as in hf_generate
            if "probability tensor contains" not in str(e):
                raise
            raise NonFiniteError("the model's logits are NaN or inf while generating: its weights are broken") from e
        return [(new, None) for new in out[:, width:].tolist()]

    was_training = model.training
    model.eval()
    try:
        return turn_by_turn(tokenizer, prompts, params, ids, mask, eos, sample)
    finally:
        model.train(was_training)
