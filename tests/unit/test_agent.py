"""Multi-turn rollouts (minigrpo/agent): tool calls parsed, run and answered; the engine's cache-extending loop
against the HF reference loop; the loss mask of a trajectory."""

import asyncio
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigrpo.agent.tools import calculator, load_tool, parse_tool_calls, run_calls
from minigrpo.agent.turns import Episodes, MultiTurn, render_after_turn
from minigrpo.errors import ConfigError
from minigrpo.logprobs import policy_logprobs
from minigrpo.rollout import engine, hf
from minigrpo.rollout.types import SamplingParams, make_trajectories
from minigrpo.tasks.arith import arith_rows
from minigrpo.tiny import tiny_model, tiny_tokenizer

ASSET = Path(__file__).resolve().parents[2] / "minigrpo" / "assets" / "tiny-arith"


def slow_tool(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(seconds)
    return "slept"


async def async_tool(word: str) -> str:
    """Echo a word after a pause.

    Args:
        word: the word.
    """
    await asyncio.sleep(0.01)
    return word.upper()


def broken_tool(x: int) -> str:
    """Always fails.

    Args:
        x: anything.
    """
    raise RuntimeError("boom")


TOOLS = {"calculator": calculator, "slow_tool": slow_tool, "async_tool": async_tool, "broken_tool": broken_tool}


def test_calculator_is_exact_and_evaluates_nothing_else():
    assert calculator("48213 * 7391 - 12") == str(48213 * 7391 - 12)
    assert calculator("(3 + 4) * 2 ** 3 / 4") == "14"
    assert calculator("7 / 2") == "3.5"
    assert calculator("12,345 × 2") == "24690"
    for bad in ("__import__('os').system('ls')", "x + 1", "[1] * 10", "2 ** 10**9", "'a' * 3"):
        with pytest.raises((ValueError, SyntaxError)):
            calculator(bad)


def test_tool_calls_in_both_formats():
    text = ('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call>'
            '<tool_call>\n{"name": "async_tool", "arguments": "{\\"word\\": \\"hi\\"}"}\n</tool_call>'
            "<tool_call>calculator 6 * 7</tool_call><tool_call>calculator\n1 + 1\n</tool_call>")
    calls = parse_tool_calls(text, TOOLS)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"expression": "2 + 3"}, ""), ("async_tool", {"word": "hi"}, ""),
        ("calculator", {"expression": "6 * 7"}, ""), ("calculator", {"expression": "1 + 1"}, "")]
    bad = parse_tool_calls('<tool_call>search cats</tool_call><tool_call>{"name": "calculator", "arguments": '
                           '"{oops"}</tool_call><tool_call>{"name": "calculator", "arguments": [1]}</tool_call>',
                           TOOLS)
    assert [c.error.split(":")[0] for c in bad] == ["error"] * 3 and "unknown tool 'search'" in bad[0].error
    assert parse_tool_calls("no call here, <tool_call> unclosed", TOOLS) == []


def test_calls_run_concurrently_and_failures_answer_the_model():
    calls = parse_tool_calls("<tool_call>slow_tool 0.4</tool_call><tool_call>slow_tool 0.4</tool_call>"
                             "<tool_call>async_tool hi</tool_call><tool_call>broken_tool 1</tool_call>"
                             "<tool_call>calculator 1 +</tool_call><tool_call>nope 1</tool_call>", TOOLS)
    t0 = time.perf_counter()
    out = run_calls(calls, TOOLS, timeout=5)
    assert time.perf_counter() - t0 < 0.75  # the two 0.4 s calls ran side by side
    assert [(text, failed) for text, failed, _ in out[:3]] == [("slept", False), ("slept", False), ("HI", False)]
    assert out[3][:2] == ("error: RuntimeError: boom", True)
    assert out[4][1] and out[4][0].startswith("error: SyntaxError")
    assert out[5][1] and "unknown tool 'nope'" in out[5][0]
    assert 0.35 < out[0][2] < 0.75  # its seconds


def test_a_call_past_its_timeout_is_answered_and_left_behind():
    calls = parse_tool_calls("<tool_call>slow_tool 30</tool_call>", TOOLS)
    t0 = time.perf_counter()
    (text, failed, _), = run_calls(calls, TOOLS, timeout=0.3)
    assert time.perf_counter() - t0 < 1.0 and failed and text == "error: slow_tool timed out after 0.3 s"


def test_a_tool_the_template_cannot_describe_is_refused():
    def no_doc(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="no_doc.*docstring"):
        load_tool(no_doc)
    with pytest.raises(ConfigError, match="unknown tool 'search'"):
        load_tool("search")
    assert load_tool("minigrpo.agent.tools:calculator") is calculator


def test_the_answer_is_what_the_template_writes_after_the_turn():
    tok = tiny_tokenizer()  # ChatML: <|im_start|>role\ncontent<|im_end|>\n; eos = <|im_end|>
    ids = render_after_turn(tok, [{"role": "tool", "name": "calculator", "content": "5"}], eos_text="<|im_end|>")
    assert tok.decode(ids) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    ids = render_after_turn(tok, [{"role": "tool", "content": "5"}])  # the turn ended on a stop string: no EOS yet
    assert tok.decode(ids) == "<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"


class Teacher(Episodes):
    """A deterministic responder: every turn is answered by a user message naming the turn's length."""

    def respond(self, rows, texts):
        return [[{"role": "user", "content": f"Ann has {len(t)} pens. How many pens does Ann have now?"}]
                for t in texts]


class Scripted(MultiTurn):
    def begin(self, tokenizer, eos, rows):
        return Teacher(self, tokenizer, eos, rows)


@pytest.fixture(scope="module")
def arith():
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in arith_rows("test", 3)]
    return model, tok, prompts


@pytest.mark.parametrize("budget", [60, 30])
def test_greedy_multi_turn_engine_equals_the_hf_reference_loop(arith, budget):
    model, tok, prompts = arith
    params = SamplingParams(n=2, max_new_tokens=budget, temperature=0, turns=Scripted(max_turns=3))
    a, b = engine.generate(model, tok, prompts, params), hf.generate(model, tok, prompts, params)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.tool_mask, b.tool_mask) and a.completions == b.completions
    assert a.truncated.tolist() == b.truncated.tolist() and a.stats == b.stats
    first = tok.decode(a.completion_ids[0][a.completion_mask[0].bool()])
    if budget == 60:  # three turns, each ended by the model, two answers between them
        assert a.stats["turns"] == [3.0] * 6 and not a.truncated.any()
        assert first.count("<|assistant|>") == 2 and first.count("How many pens does Ann have now?") == 2
    else:  # the third turn's answer does not fit: cut there, a truncated completion
        assert a.truncated.all() and a.stats["turns"] == [2.0] * 6
    on = a.tool_mask[0].nonzero()[:, 0].tolist()  # the first answer's tokens, exactly, right after the first turn
    turn = tok.decode(a.completion_ids[0, :on[0]], skip_special_tokens=True)
    answer = render_after_turn(tok, [{"role": "user", "content": f"Ann has {len(turn)} pens. How many pens does "
                                                                 f"Ann have now?"}], "<|endoftext|>")
    assert a.completion_ids[0, on[:len(answer)]].tolist() == answer and on[:len(answer)] == list(
        range(on[0], on[0] + len(answer)))
    assert (a.logprobs[a.tool_mask.bool()] == 0).all() and (a.logprobs[a.generated_mask.bool()] < 0).any()


def test_the_loss_mask_of_a_trajectory_is_its_assistant_tokens():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=2)
    eos = [tok.eos_token_id]
    episodes = MultiTurn(tools=[calculator], max_turns=3).begin(tok, eos, rows=1)
    turn1 = tok("<tool_call>calculator 2 + 3</tool_call>", add_special_tokens=False).input_ids + eos
    answer = episodes.end_turn([0], [turn1], room=[100])[0]
    assert tok.decode(answer) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert episodes.stats == {"turns": [2.0], "tool_calls": [1.0], "tool_errors": [0.0],
                              "tool_s": episodes.stats["tool_s"]}
    turn2 = tok("#### 5", add_special_tokens=False).input_ids + eos
    assert episodes.end_turn([0], [turn2], room=[100]) == [None]  # no call: over
    trajectory = turn1 + answer + turn2
    tool_mask = torch.tensor([[0.0] * len(turn1) + [1.0] * len(answer) + [0.0] * len(turn2)])
    prompt = tok.apply_chat_template([{"role": "user", "content": "2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    prompt_ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    ro = make_trajectories(tok, [prompt], 1, prompt_ids, torch.ones_like(prompt_ids), torch.tensor([trajectory]),
                           [len(trajectory)], tool_mask, [False], episodes.stats)
    expected = [1.0] * len(turn1) + [0.0] * len(answer) + [1.0] * len(turn2)
    assert ro.generated_mask[0].tolist() == expected and ro.completion_mask[0].sum() == len(trajectory)
    assert ro.completions[0] == "<tool_call>calculator 2 + 3</tool_call>\ntool\n5\nassistant\n#### 5"
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    C = ro.completion_ids.shape[1]
    full, _ = policy_logprobs(model, ids, attention, C, 1.0)
    masked, entropy = policy_logprobs(model, ids, attention, C, 1.0, target_mask=ro.generated_mask)
    on = ro.generated_mask.bool()
    assert (masked[~on] == 0).all() and (entropy[~on] == 0).all()  # tool tokens never reach the LM head
    torch.testing.assert_close(masked[on], full[on])  # the assistant tokens' values are unchanged


def test_tools_called_with_wrong_arguments_answer_with_an_error():
    """A call naming an argument the tool does not have: the model is told, sync or async alike."""
    from minigrpo.agent.tools import Call, run_calls

    calls = [Call("calculator", {"expr": "1 + 1"}), Call("async_tool", {"town": "x"})]
    out = run_calls(calls, TOOLS, timeout=5)
    assert [(failed, "unexpected keyword argument" in text) for text, failed, _ in out] == [(True, True), (True, True)]
