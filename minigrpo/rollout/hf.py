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
    make_trajectories,
    stop_length,
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
    re-reading its whole conversation (prompt, earlier turns, tool answers) from scratch, the simple way the
    engine's cache-extending loop is checked against. Greedy, both give the same trajectories."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
    B, T, eos, pad = ids.shape[0], params.max_new_tokens, eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    episodes = params.turns.begin(tokenizer, eos, B)
    prompt_rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    trajectory: list[list[int]] = [[] for _ in range(B)]
    from_tools: list[list[int]] = [[] for _ in range(B)]  # 1 where a token came from a tool answer
    going, finished = list(range(B)), [False] * B  # finished: the model ended it (not the budget)
    greedy = params.temperature == 0
    was_training = model.training
    model.eval()
    while going:
        rows = [prompt_rows[r] + trajectory[r] for r in going]
        width = max(map(len, rows))
        batch = torch.tensor([[pad] * (width - len(x)) + x for x in rows], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows], device=device)
        stops = StoppingCriteriaList([StopStrings(tokenizer, params.stop, width)] if params.stop else [])
        try:
            out = model.generate(
                input_ids=batch, attention_mask=attention, max_new_tokens=max(T - len(trajectory[r]) for r in going),
                do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None if greedy else params.top_k, eos_token_id=eos,
                pad_token_id=pad, stopping_criteria=stops)
        except RuntimeError as e:  # as in hf_generate
            if "probability tensor contains" not in str(e):
                raise
            raise NonFiniteError("the model's logits are NaN or inf while generating: its weights are broken") from e
        ended_rows, turns = [], []
        for r, new in zip(going, out[:, width:].tolist()):
            new = new[:T - len(trajectory[r])]  # this row's budget
            end = next((i + 1 for i, tok in enumerate(new) if tok in eos), None)
            if params.stop:
                at = stop_length(tokenizer, new[:end] if end else new, params.stop)
                end = at if at is not None else end
            turn = new[:end] if end else new
            trajectory[r] += turn
            from_tools[r] += [0] * len(turn)
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
                going.append(r)
            else:
                finished[r] = not episodes.cut[r]
    model.train(was_training)
    lengths = [len(x) for x in trajectory]
    C = max(lengths, default=0)
    tokens = torch.tensor([x + [pad] * (C - len(x)) for x in trajectory], device=device).reshape(B, C)
    tool_mask = torch.tensor([x + [0] * (C - len(x)) for x in from_tools], device=device, dtype=torch.float)
    return make_trajectories(tokenizer, prompts, params.n, ids, mask, tokens, lengths, tool_mask.reshape(B, C),
                             [not f for f in finished], episodes.stats)
