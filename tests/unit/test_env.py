"""Environments (minigrpo/agent/env.py): reset with each trajectory's row, stepped at every turn end (the last turn
too), their rewards summed into `environment_reward`; errors end one trajectory, never the run; the engine's
cache-extending loop against the HF reference loop with an environment answering."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigrpo.agent.env import Retry, Step, as_step, load_environment
from minigrpo.agent.turns import MultiTurn, render_after_turn
from minigrpo.config import Config
from minigrpo.errors import ConfigError
from minigrpo.evaluate import evaluate
from minigrpo.rollout import engine, hf
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.answers import extract_answer
from minigrpo.tasks.arith import arith_rows
from minigrpo.tasks.rewards import environment_reward
from minigrpo.tiny import tiny_tokenizer

ASSET = Path(__file__).resolve().parents[2] / "minigrpo" / "assets" / "tiny-arith"


def turn(tok, text):
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_retry_answers_a_miss_and_scores_the_second_try():
    tok = tiny_tokenizer()  # ChatML: <|im_start|>role\ncontent<|im_end|>\n; eos = <|im_end|>
    episodes = MultiTurn(environment=Retry, max_turns=3).bound([{"answer": "7"}, {"answer": "9"}], 1).begin(
        tok, [tok.eos_token_id], rows=2)
    first = episodes.end_turn([0, 1], [turn(tok, "#### 5"), turn(tok, "#### 9")], room=[100, 100])
    assert tok.decode(first[0]) == "\n<|im_start|>user\n5 is not right. Try again.<|im_end|>\n<|im_start|>assistant\n"
    assert first[1] is None  # right at once: done
    assert episodes.stats["env_reward"] == [0.0, 1.0] and episodes.stats["turns"] == [2.0, 1.0]
    assert episodes.end_turn([0], [turn(tok, "no idea")], room=[100])[0] is not None  # "Give the answer as #### N."
    assert episodes.end_turn([0], [turn(tok, "#### 7")], room=[100]) == [None]  # max_turns reached: still scored
    assert episodes.stats["env_reward"] == [0.5, 1.0] and episodes.stats["turns"] == [3.0, 1.0]
    assert episodes.stats["env_errors"] == [0.0, 0.0] and episodes.stats["tool_calls"] == [0.0, 0.0]


class Counter:
    """Counts the turns it sees; raises on the row whose answer is 'boom'; a tuple step; reward 0.25 a turn."""
    steps: list[str] = []

    def reset(self, row):
        self.row = row

    def step(self, text):
        Counter.steps.append(text)
        if self.row["answer"] == "boom":
            raise RuntimeError("the environment broke")
        return "Go on.", 0.25, False


def test_an_environment_error_ends_its_trajectory_only_and_the_last_turn_is_stepped():
    tok = tiny_tokenizer()
    Counter.steps = []
    episodes = MultiTurn(environment=Counter, max_turns=2).bound([{"answer": "1"}, {"answer": "boom"}], 1).begin(
        tok, [tok.eos_token_id], rows=2)
    out = episodes.end_turn([0, 1], [turn(tok, "a"), turn(tok, "b")], room=[100, 100])
    assert out[0] is not None and out[1] is None
    assert episodes.stats["env_errors"] == [0.0, 1.0] and episodes.stats["env_reward"][0] == 0.25
    assert episodes.end_turn([0], [turn(tok, "c")], room=[100]) == [None]  # the last turn: stepped, then over
    assert Counter.steps == ["a", "b", "c"] and episodes.stats["env_reward"][0] == 0.5
    assert environment_reward(["p", "q"], ["a", "b"], environment_reward=episodes.stats["env_reward"]) == [0.5, None]


def test_environments_are_checked():
    with pytest.raises(ConfigError, match="environment: unknown environment 'maze'"):
        load_environment("maze")
    with pytest.raises(ConfigError, match=r"environment: cannot load 'no_such_pkg:Env'"):
        load_environment("no_such_pkg:Env")

    class NoStep:
        def reset(self, row):
            pass

    with pytest.raises(ConfigError, match="NoStep needs reset"):
        load_environment(NoStep)
    assert load_environment("retry") is Retry and load_environment(f"{Counter.__module__}:Counter") is Counter
    with pytest.raises(ConfigError, match="environment and tools"):
        Config(environment="retry", tools=["calculator"]).validate()
    Config(environment="retry", rollout_backend="vllm").validate_grpo()  # every backend runs turns (vllm: with_vllm/)
    assert Config(environment=Retry).to_dict()["environment"] == "minigrpo.agent.env:Retry"
    with pytest.raises(ValueError, match="needs each trajectory's row"):
        MultiTurn(environment=Retry).begin(tiny_tokenizer(), [0], rows=2)
    with pytest.raises(ConfigError, match="reward_funcs: 'environment' returns the rewards of a multi-turn"):
        Config(reward_funcs=["correctness", "environment"]).validate_grpo()
    Config(reward_funcs=["correctness", "environment"]).validate()  # evaluation and SFT score no rewards
    with pytest.raises(ConfigError, match="eval_metric: 'environment' returns the rewards of a multi-turn"):
        Config(eval_metric="environment").validate()
    with pytest.raises(ConfigError, match="was a class handed over from Python"):
        load_environment("python:Guess")
    assert environment_reward(["p"], ["c"]) == [None]  # no environment: no opinion
    assert Step("x", 1.0, True) == Step(messages="x", reward=1.0, done=True)


@pytest.mark.parametrize("budget", [48, 20])
def test_greedy_engine_equals_the_hf_reference_loop_with_an_environment(budget):
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    rows = arith_rows("test", 3, steps=1, max_number=99)  # beyond it: misses, answered "N is not right."
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    golds = [{"answer": r["answer"].rsplit("#### ", 1)[1]} for r in rows]
    turns = MultiTurn(environment=Retry, max_turns=3).bound(golds, 2)
    params = SamplingParams(n=2, max_new_tokens=budget, temperature=0, turns=turns)
    a, b = engine.generate(model, tok, prompts, params), hf.generate(model, tok, prompts, params)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.tool_mask, b.tool_mask)
    untimed = [{k: v for k, v in ro.stats.items() if not k.endswith("_s")} for ro in (a, b)]  # seconds differ
    assert a.completions == b.completions and untimed[0] == untimed[1] and a.truncated.tolist() == b.truncated.tolist()
    on = a.tool_mask[0].nonzero()[:, 0].tolist()  # the environment's first answer, right after the first turn
    said = extract_answer(tok.decode(a.completion_ids[0, :on[0]], skip_special_tokens=True))
    answer = render_after_turn(tok, [{"role": "user", "content": f"{said} is not right. Try again."}], "<|endoftext|>")
    assert a.completion_ids[0, on[0]:on[0] + len(answer)].tolist() == answer and max(a.stats["turns"]) > 1
    if budget == 48:
        missed = [i for i, t in enumerate(a.stats["turns"]) if t == 3]
        assert missed and all(a.stats["env_reward"][i] in (0.0, 0.5) for i in missed)


class Tag:
    """Rewards each turn with its row's index: a trajectory scored from another row's environment shows."""

    def reset(self, row):
        self.index = row["index"]

    def step(self, text):
        return "Again.", float(self.index), False  # 1, 2, 3, 4: no row's reward is 0


@pytest.mark.parametrize("backend", [engine, hf])
def test_each_trajectory_talks_to_the_environment_of_its_own_row(backend):
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    rows = arith_rows("test", 4, steps=1, max_number=99)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    turns = MultiTurn(environment=Tag, max_turns=2).bound([{"index": i + 1} for i in range(4)], 3)
    torch.manual_seed(0)
    ro = backend.generate(model, tok, prompts, SamplingParams(n=3, max_new_tokens=40, temperature=1.0, turns=turns))
    steps = [t - cut for t, cut in zip(ro.stats["turns"], ro.truncated.tolist())]  # a cut turn is never stepped
    assert ro.stats["env_reward"] == [(i // 3 + 1) * s for i, s in enumerate(steps)]  # row i is prompt i // 3's
    assert 2.0 in steps  # the answer to the first turn reached the model and its second turn was scored


class StopOrGo:
    """Ends the trajectory after the first turn when its row says stop, else asks again."""

    def reset(self, row):
        self.stop = row["stop"]

    def step(self, text):
        return Step(done=True) if self.stop else Step(messages="1")


def test_evaluate_resets_each_problem_with_its_row():
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    rows = arith_rows("test", 5, steps=1, max_number=99)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    golds = [r["answer"].rsplit("#### ", 1)[1] for r in rows]
    stops = [True, False, False, True, False]
    turns = MultiTurn(environment=StopOrGo, max_turns=2)
    report = evaluate(model, tok, prompts, golds, 40, batch_size=2, backend="engine", turns=turns, keep_records=True,
                      rows=[{"stop": s} for s in stops])
    # the model answers '#### N' in every turn: one answer where its row said stop, two where it asked again
    assert [r["completion"].count("####") for r in report["records"]] == [1 if s else 2 for s in stops]
    with pytest.raises(ValueError, match="pass rows="):
        evaluate(model, tok, prompts, golds, 8, turns=turns)


class Broken:
    """Misbehaves as its row says."""

    def __init__(self):
        pass

    def reset(self, row):
        self.how = row["how"]
        if self.how == "reset":
            raise RuntimeError("reset failed")

    def step(self, text):
        return {"reward": ("Go on.", "1", False), "messages": (5, 0.0, False), "dicts": (["hi"], 0.0, False),
                "type": 42, "fine": ("Go on.", 0.5, False)}[self.how]


def test_a_misbehaving_environment_ends_its_trajectory_unscored():
    tok = tiny_tokenizer()
    hows = ["reset", "reward", "messages", "dicts", "type", "fine"]
    episodes = MultiTurn(environment=Broken, max_turns=3).bound([{"how": h} for h in hows], 1).begin(
        tok, [tok.eos_token_id], rows=len(hows))
    out = episodes.end_turn(list(range(6)), [turn(tok, "a")] * 6, room=[100] * 6)
    assert [o is not None for o in out] == [False] * 5 + [True]
    assert episodes.stats["env_errors"] == [1.0] * 5 + [0.0]
    rewards = environment_reward(["p"] * 6, ["c"] * 6, environment_reward=episodes.stats["env_reward"])
    assert rewards == [None] * 5 + [0.5]  # failed: not scored (as a reward that raised), never a silent 0
    with pytest.raises(TypeError, match="reward must be a number"):
        as_step(("x", True, False))


def test_a_factory_that_raises_ends_its_trajectory_only():
    tok = tiny_tokenizer()
    made = []

    def factory():
        made.append(1)
        if len(made) == 1:
            raise RuntimeError("no environment for you")
        return Retry()

    episodes = MultiTurn(environment=factory, max_turns=2).bound([{"answer": "3"}, {"answer": "3"}], 1).begin(
        tok, [tok.eos_token_id], rows=2)
    assert episodes.end_turn([0, 1], [turn(tok, "#### 2")] * 2, room=[100, 100])[0] is None
    assert episodes.stats["env_errors"] == [1.0, 0.0] and episodes.stats["turns"] == [1.0, 2.0]
