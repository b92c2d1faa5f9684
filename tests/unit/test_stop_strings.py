"""Stop strings (SamplingParams.stop), one convention in every backend: the completion ends with the token that
completes the stop string; that token is in the completion, its mask and its text; the row is not truncated."""

from types import SimpleNamespace

import pytest
import torch

from minigrpo.config import Config
from minigrpo.model import load_model
from minigrpo.rollout.engine import engine_generate
from minigrpo.rollout.hf import hf_generate
from minigrpo.rollout.types import SamplingParams, make_rollout
from minigrpo.rollout.vllm import rollout_from_outputs
from minigrpo.tasks.arith import arith_rows
from minigrpo.tasks.prompts import stop_strings
from minigrpo.tiny import tiny_model, tiny_tokenizer

QUESTION = stop_strings(Config(template="fewshot"))  # ["\nQuestion:"]
BACKENDS = {"engine": engine_generate, "hf": hf_generate}


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_make_rollout_ends_at_the_token_completing_the_stop_string():
    tok = tiny_tokenizer()  # byte-level: one token per character; eos = pad
    eos = tok.eos_token_id
    rows = [_ids(tok, "#### 5\n\nQuestion: 7+1?"),  # stops at ':'
            _ids(tok, "#### 5") + [eos] + _ids(tok, "\nQuestion: 7"),  # EOS first: the stop string comes after it
            _ids(tok, "#### 5\n\nQuest, no stop"),  # truncated
            _ids(tok, "\nQuestion:") + [eos] * 3]  # stops on its last token; the EOS after it is not counted
    C = max(len(r) for r in rows)
    ids = torch.tensor([r + [eos] * (C - len(r)) for r in rows])
    ro = make_rollout(tok, ["p"], 4, torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), ids,
                      [eos], QUESTION)
    assert ro.completion_mask.sum(1).tolist() == [17, 7, len("#### 5\n\nQuest, no stop"), 10]
    assert ro.completions == ["#### 5\n\nQuestion:", "#### 5", "#### 5\n\nQuest, no stop", "\nQuestion:"]
    assert ro.truncated.tolist() == [False, False, True, False]
    assert ro.completion_ids[0, :17].tolist() == rows[0][:17]
    assert ro.completion_ids[0, 17:].tolist() == [tok.pad_token_id] * (C - 17)  # padding after the stop token
    # Without stop strings: exactly today's rollout.
    plain = make_rollout(tok, ["p"], 4, torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long),
                         ids, [eos])
    assert plain.completion_mask.sum(1).tolist() == [C, 7, len(rows[2]), 11]
    assert torch.equal(plain.completion_ids, ids)


def test_make_rollout_keeps_the_whole_completing_token():
    """A token spelling more than the stop string ends the completion whole (its text included)."""
    _, tok = load_model(Config(model="tiny-arith"))  # word-level: " pens" is one token
    eos = tok.eos_token_id
    row = _ids(tok, "7 pens - 3 pens = 4 pens.\n#### 4") + [eos]
    ro = make_rollout(tok, ["p"], 1, torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                      torch.tensor([row]), [eos], ["pen", "####"])
    assert ro.completions == ["7 pens"] and ro.completion_mask.sum().item() == 2
    assert not ro.truncated.item()


class Script:
    """Force greedy decoding to spell TEXT, read at the position being predicted (a forward hook on the model):
    a row whose prompt is one token longer spells TEXT from its second character. Both backends call the model
    the same way, so the hook drives them alike."""

    TEXT = "#### 5\n\nQuestion: 9+9?\nAnswer: 18\n#### 18\n\nQuestion: 1+1?"

    def __init__(self, model, tok, start: int):
        self.ids = _ids(tok, self.TEXT)
        self.start = start  # position of the last token of the shorter prompt
        model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, out):
        positions = kwargs["position_ids"][:, -1].tolist()
        forced = torch.tensor([self.ids[min(p - self.start, len(self.ids) - 1)] for p in positions])
        out.logits[:, -1] = -1e4
        out.logits[torch.arange(len(forced)), -1, forced] = 1e4


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backends_stop_at_the_token_completing_question(backend):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=4)
    prompts = ["Question: 1+1?\nAnswer:", "Question: 10+1?\nAnswer:"]
    Script(model, tok, start=len(_ids(tok, prompts[0])) - 1)
    greedy = SamplingParams(n=2, max_new_tokens=40, temperature=0.0, stop=QUESTION)
    ro = BACKENDS[backend](model, tok, prompts, greedy)
    first, second = "#### 5\n\nQuestion:", "### 5\n\nQuestion:"
    assert ro.completions == [first, first, second, second]
    assert ro.completion_mask.sum(1).tolist() == [17, 17, 16, 16]
    assert ro.truncated.tolist() == [False] * 4
    assert ro.completion_ids.shape[1] == 17  # generation stopped with the last row: no 40 tokens
    assert ro.completion_ids[0].tolist() == _ids(tok, first)
    assert ro.completion_ids[2].tolist() == _ids(tok, second) + [tok.pad_token_id]
    # Without the stop string the model writes on into the next question.
    plain = BACKENDS[backend](model, tok, prompts, SamplingParams(n=1, max_new_tokens=40, temperature=0.0))
    assert plain.completions[0] == Script.TEXT[:40] and plain.truncated.tolist() == [True, True]


def _primed_arith_prompts(tok, n=8):
    """Arith prompts with the first operand of the solution already written: the shipped model then writes
    worked solutions ("16 - 4 = 12.\\n12 - 3 = ..."), where stop strings have something to find."""
    rows = arith_rows("test", n)
    return [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                    add_generation_prompt=True) + r["answer"].split(" ")[0] for r in rows]


def test_engine_equals_hf_greedy_with_stop_strings():
    model, tok = load_model(Config(model="tiny-arith"))
    prompts = _primed_arith_prompts(tok)
    greedy = SamplingParams(n=1, max_new_tokens=40, temperature=0.0, stop=["- 3", "7."])
    ours, ref = engine_generate(model, tok, prompts, greedy), hf_generate(model, tok, prompts, greedy)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_mask, ref.completion_mask)
    assert torch.equal(ours.truncated, ref.truncated)
    assert ours.completions == ref.completions
    assert ours.completions[:3] == [" - 4 = 2.\n2 - 3", " - 3", " + 1 = 17."]  # the shipped model's greedy text
    plain = engine_generate(model, tok, prompts, SamplingParams(n=1, max_new_tokens=40, temperature=0.0))
    for text, full in zip(ours.completions, plain.completions):
        stopped = text.endswith(("- 3", "7."))
        assert stopped == ("- 3" in full or "7." in full)
        assert full.startswith(text) and (stopped or text == full)  # a row with no stop string: unchanged
    assert not ours.truncated.any()
    # The sampled tokens' log-probs end with the stop token too.
    assert torch.equal(ours.logprobs != 0, ours.completion_mask.bool())


def test_stop_strings_never_match_across_the_prompt():
    """The first prompt ends with "16" and its completion starts " - 4": "16 - 4" is not in the completion."""
    model, tok = load_model(Config(model="tiny-arith"))
    prompts = _primed_arith_prompts(tok, 1)
    assert prompts[0].endswith("16")
    for generate in BACKENDS.values():
        ro = generate(model, tok, prompts, SamplingParams(n=1, max_new_tokens=40, temperature=0.0, stop=["16 - 4"]))
        assert ro.completions == [" - 4 = 2.\n2 - 3 = 0.\n0 + 1 = 1.\n#### 1"]


def test_vllm_outputs_stopped_on_a_string_get_no_eos_appended():
    tok = tiny_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    stopped = _ids(tok, "#### 5\n\nQuestion:")
    groups = [[SimpleNamespace(token_ids=stopped, finish_reason="stop", stop_reason="\nQuestion:"),
               SimpleNamespace(token_ids=_ids(tok, "#### 5"), finish_reason="stop", stop_reason=None)]]  # no EOS
    ro = rollout_from_outputs(tok, ["p"], 2, [_ids(tok, "p")], groups, [eos], pad, torch.device("cpu"), QUESTION)
    assert ro.completions == ["#### 5\n\nQuestion:", "#### 5"]
    assert ro.completion_mask.sum(1).tolist() == [17, 7]  # the stop token; the EOS
    assert ro.completion_ids[1, 6].item() == eos and ro.truncated.tolist() == [False, False]
