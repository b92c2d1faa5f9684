"""Adapters (minigrpo/agent/adapters.py): a real OpenEnv Environment run in-process and a real verifiers Env
(taskset, multi-turn run(), @vf.reward) stepped through minigrpo's environment protocol, their rewards and ends
carried over; then each in a multi-turn rollout of the tiny model (the engine). Each
test skips where its library is not installed (`pip install openenv-core verifiers`)."""

import importlib
import sys
import types
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from minigrpo.agent.adapters import openenv_environment, verifiers_environment
from minigrpo.agent.env import Step, as_step, load_environment
from minigrpo.agent.turns import MultiTurn, render_after_turn
from minigrpo.errors import ConfigError
from minigrpo.rollout import engine
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.answers import extract_answer, is_correct
from minigrpo.tasks.arith import arith_rows
from minigrpo.tiny import tiny_tokenizer

ASSET = Path(__file__).resolve().parents[2] / "minigrpo" / "assets" / "tiny-arith"


def _optional(name):
    """The library imported once, at collection (several seconds: fastapi, gradio, mcp), or None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


openenv_core, vf = _optional("openenv.core"), _optional("verifiers.v1")


def _module(monkeypatch, name, **objects):
    """An importable module holding `objects` (exported through __all__, as verifiers' loader wants)."""
    module = types.ModuleType(name)
    module.__dict__.update(objects, __all__=list(objects))
    monkeypatch.setitem(sys.modules, name, module)
    return module


def turn(tok, text):
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


# ---- OpenEnv -----------------------------------------------------------------------------------------------

def guess_environment():
    """An OpenEnv environment: guess the secret set at reset; "higher" / "lower" until right (reward 1, done)."""

    class GuessAction(openenv_core.Action):
        text: str

    class GuessObservation(openenv_core.Observation):
        hint: str = ""

    class GuessEnvironment(openenv_core.Environment):
        def __init__(self):
            super().__init__()
            self._state = openenv_core.State(step_count=0)

        def reset(self, seed=None, episode_id=None, secret="5", **kwargs):
            self.secret, self._state = secret, openenv_core.State(step_count=0)
            return GuessObservation(hint="Guess 1-9.")

        def step(self, action: GuessAction, timeout_s=None, **kwargs) -> GuessObservation:
            self._state.step_count += 1
            said = extract_answer(action.text)
            if said == self.secret:
                return GuessObservation(hint="Right.", reward=1.0, done=True)
            if said is None:
                return GuessObservation(hint="Give the answer as #### N.", reward=0.0)
            return GuessObservation(hint=f"{said} is not right. Try again.", reward=0.0)

        @property
        def state(self):
            return self._state

    return GuessEnvironment


def test_an_openenv_environment_runs_in_process_through_the_adapter(monkeypatch):
    pytest.importorskip("openenv.core")
    env = guess_environment()
    _module(monkeypatch, "minigrpo_test_openenv", GuessEnvironment=env)
    factory = load_environment("openenv:minigrpo_test_openenv:GuessEnvironment")
    game = factory()
    game.reset({"question": "?", "answer": "7"})  # no reset= mapping: the environment's own secret, 5
    first = as_step(game.step("#### 3"))
    assert first == Step(messages=[{"role": "user", "content": "3 is not right. Try again."}], reward=0.0)
    assert game.step("no idea") == ("Give the answer as #### N.", 0.0, False)  # what the adapter gives
    last = as_step(game.step("#### 5"))
    assert (last.messages, last.reward, last.done) == (None, 1.0, True)

    game = openenv_environment(env, reset=lambda row: {"secret": row["answer"]})()
    game.reset({"answer": "7"})
    assert as_step(game.step("#### 7")).reward == 1.0  # reset(row) -> reset()'s arguments

    with pytest.raises(ConfigError, match="'openenv:package.module:Class'"):
        load_environment("openenv:minigrpo_test_openenv")


def test_an_openenv_action_that_is_not_text_needs_a_mapping():
    pytest.importorskip("openenv.core")

    class Move(openenv_core.Action):
        x: int
        y: int

    class Board(openenv_core.Environment):
        def reset(self, seed=None, episode_id=None, **kwargs):
            return openenv_core.Observation()

        def step(self, action: Move, timeout_s=None, **kwargs):
            return openenv_core.Observation(reward=float(action.x + action.y), done=True)

        @property
        def state(self):
            return openenv_core.State()

    with pytest.raises(ConfigError, match=r"Board's action Move has required text fields \[\]"):
        openenv_environment(Board)
    game = openenv_environment(Board, action=lambda text: Move(x=len(text), y=1))()
    game.reset({})
    assert as_step(game.step("abc")).reward == 4.0


def test_a_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "verifiers.v1", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "openenv.core", None)
    with pytest.raises(ConfigError, match="pip install verifiers"):
        load_environment("verifiers:gsm8k")
    with pytest.raises(ConfigError, match="pip install openenv-core"):
        openenv_environment(object)


# ---- verifiers ---------------------------------------------------------------------------------------------

def guess_taskset(monkeypatch):
    """A verifiers taskset package `minigrpo_test_guess` (importable, as verifiers' loader wants): tasks whose
    reward is whether the last reply's answer is the row's, and a multi-turn Env telling the player it is wrong
    until it is right; `answered`, a reward a config may plug in (verifiers' TaskConfig.rewards)."""

    class GuessData(vf.TaskData):
        answer: str

    class GuessTask(vf.Task[GuessData, vf.State, vf.TaskConfig]):
        @vf.reward
        async def correct(self, task, trace) -> float:
            return float(is_correct(trace.last_reply, task.answer))

    class GuessTaskset(vf.Taskset[GuessTask, vf.TasksetConfig]):
        def load(self):
            yield GuessTask(GuessData(prompt="Guess 1-9.", answer="5"), self.config.task)

    class GuessEnvConfig(vf.EnvConfig):
        player: vf.AgentConfig = vf.AgentConfig()

    class GuessEnv(vf.Env[GuessEnvConfig]):
        async def run(self, task, agents):
            async with agents.player.interaction(task) as exchange:
                segment = await exchange.turn()
                while not segment.terminated and not is_correct(segment.last_reply, task.data.answer):
                    said = extract_answer(segment.last_reply)
                    segment = await exchange.turn(f"{said} is not right. Try again." if said is not None
                                                  else "Give the answer as #### N.")
            exchange.trace.record_metric("turns", exchange.trace.num_turns)

    async def answered(trace) -> float:
        return float(extract_answer(trace.last_reply) is not None)

    _module(monkeypatch, "minigrpo_test_guess", GuessTaskset=GuessTaskset, GuessEnv=GuessEnv, answered=answered)
    _module(monkeypatch, "minigrpo_test_plain", GuessTaskset=GuessTaskset)  # no Env: verifiers' SingleAgentEnv


def test_a_verifiers_multi_turn_env_is_stepped_and_scored_by_its_rewards(monkeypatch):
    pytest.importorskip("verifiers.v1")
    guess_taskset(monkeypatch)
    factory = load_environment("verifiers:minigrpo_test_guess")
    game = factory()
    game.reset({"question": "Guess 1-9.", "answer": "7"})  # the row's answer, not the taskset's
    first = as_step(game.step("#### 3"))
    assert first == Step(messages=[{"role": "user", "content": "3 is not right. Try again."}], reward=0.0)
    last = as_step(game.step("#### 7"))
    assert last == Step(messages=None, reward=1.0, done=True)
    trace = game.episode.seat.trace  # verifiers' own record of the conversation
    assert [m.role for m in trace.messages] == ["user", "assistant", "user", "assistant"]
    assert trace.metrics["turns"] == 2 and trace.reward == 1.0

    other = factory()  # one env, many trajectories: each its own run() and trace
    other.reset({"question": "Guess 1-9.", "answer": "2"})
    assert as_step(other.step("#### 2")) == last
    plain = load_environment("verifiers:minigrpo_test_plain")()  # verifiers' SingleAgentEnv: one reply, scored
    plain.reset({"prompt": "Guess 1-9.", "answer": "5"})
    assert as_step(plain.step("#### 5")) == last and plain.episode.seat.trace.num_turns == 1


def test_verifiers_rewards_sum_to_the_score_where_the_trajectory_ends(monkeypatch):
    pytest.importorskip("verifiers.v1")
    guess_taskset(monkeypatch)
    plugged = {"answered": {"fn": "minigrpo_test_guess:answered", "weight": 0.5}}
    factory = verifiers_environment({"taskset": {"id": "minigrpo_test_guess", "task": {"rewards": plugged}},
                                     "player": {"max_turns": 2}})  # verifiers' own config: a reward, a limit
    game = factory()
    game.reset({"question": "?", "answer": "7"})
    steps = [as_step(game.step("#### 3")), as_step(game.step("no idea"))]  # an answer (0.5), then none (0)
    assert [(s.reward, s.done) for s in steps] == [(0.5, False), (-0.5, True)]  # verifiers' max_turns ended it
    assert game.episode.seat.trace.stop_condition == "max_turns"
    game = factory()
    game.reset({"question": "?", "answer": "7"})
    assert as_step(game.step("#### 3")).reward == 0.5  # were minigrpo's max_turns 1, the trajectory's score: 0.5


def test_verifiers_envs_that_do_not_fit_are_refused(monkeypatch):
    pytest.importorskip("verifiers.v1")
    guess_taskset(monkeypatch)
    with pytest.raises(ConfigError, match="verifiers cannot load .*no_such_taskset"):
        load_environment("verifiers:no_such_taskset")
    with pytest.raises(ConfigError, match=r"seats \['assistant', 'user'\]"):
        load_environment("verifiers:user-sim+minigrpo_test_guess")  # the user is a second model

    class Opens(vf.Env[vf.SingleAgentEnvConfig]):
        async def run(self, task, agents):
            async with agents.agent.interaction(task.with_data(prompt=None)) as exchange:
                await exchange.turn("Hello!")

    factory = verifiers_environment(Opens(vf.SingleAgentEnvConfig(taskset={"id": "minigrpo_test_guess"})))
    with pytest.raises(RuntimeError, match="opened the exchange itself"):
        factory().reset({"question": "?", "answer": "1"})
    episodes = MultiTurn(environment=factory, max_turns=2).bound([{"question": "?", "answer": "1"}], 1)
    tok = tiny_tokenizer()
    state = episodes.begin(tok, [tok.eos_token_id], rows=1)  # in a rollout: that trajectory ends, unscored
    assert state.end_turn([0], [turn(tok, "#### 1")], room=[100]) == [None] and state.stats["env_errors"] == [1.0]


# ---- in a rollout of the tiny model ------------------------------------------------------------------------

def _rollout(factory):
    """The tiny model's greedy multi-turn rollout (the engine) with `factory`'s environment telling it "N is not
    right" (arith problems beyond its range: it misses), checked against what the environment said and scored."""
    tok = AutoTokenizer.from_pretrained(ASSET)
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    rows = arith_rows("test", 3, steps=1, max_number=99)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    rows = [{"question": r["question"], "answer": r["answer"].rsplit("#### ", 1)[1]} for r in rows]
    turns = MultiTurn(environment=factory, max_turns=3).bound(rows, 2)
    ro = engine.generate(model, tok, prompts, SamplingParams(n=2, max_new_tokens=48, temperature=0, turns=turns))
    assert ro.stats["env_errors"] == [0.0] * 6 and max(ro.stats["turns"]) > 1  # the environment answered
    on = ro.tool_mask[0].nonzero()[:, 0].tolist()  # its first answer, right after the first turn
    said = extract_answer(tok.decode(ro.completion_ids[0, :on[0]], skip_special_tokens=True))
    answer = render_after_turn(tok, [{"role": "user", "content": f"{said} is not right. Try again."}], "<|endoftext|>")
    assert ro.completion_ids[0, on[0]:on[0] + len(answer)].tolist() == answer
    for i, reward in enumerate(ro.stats["env_reward"]):  # scored on its last turn (a cut one is never stepped)
        after = ro.tool_mask[i].nonzero()[:, 0].max().item() + 1 if ro.tool_mask[i].any() else 0
        last = tok.decode(ro.completion_ids[i, after:], skip_special_tokens=True)
        assert reward == float(not ro.truncated[i] and is_correct(last, rows[i // 2]["answer"]))


def test_an_openenv_environment_in_a_multi_turn_rollout():
    pytest.importorskip("openenv.core")
    _rollout(openenv_environment(guess_environment(), reset=lambda row: {"secret": row["answer"]}))


def test_a_verifiers_env_in_a_multi_turn_rollout(monkeypatch):
    pytest.importorskip("verifiers.v1")
    guess_taskset(monkeypatch)
    _rollout(load_environment("verifiers:minigrpo_test_guess"))


def test_every_environment_is_closed_when_the_batch_ends():
    """Trajectories minigrpo ends itself (max_turns 1 here: one answer each) close their OpenEnv environment too."""
    pytest.importorskip("openenv.core")
    env = guess_environment()
    closed = []

    class Counted(env):
        def close(self):
            closed.append(1)

    factory = openenv_environment(Counted, reset=lambda row: {"secret": row["answer"]})
    episodes = MultiTurn(environment=factory, max_turns=1).bound([{"answer": "7"}] * 4, 1)
    tok = tiny_tokenizer()
    state = episodes.begin(tok, [tok.eos_token_id], rows=4)
    state.end_turn([0, 1, 2, 3], [turn(tok, "#### 7")] + [turn(tok, "#### 3")] * 3, room=[100] * 4)
    assert state.stats["env_reward"] == [1.0, 0.0, 0.0, 0.0] and len(closed) == 1  # the one it said done
    state.finish()
    assert len(closed) == 4  # each closed once


def test_a_verifiers_env_runs_where_an_event_loop_already_runs(monkeypatch):
    """As in a notebook: the adapter's loop has a thread of its own."""
    import asyncio

    pytest.importorskip("verifiers.v1")
    guess_taskset(monkeypatch)
    factory = load_environment("verifiers:minigrpo_test_guess")

    async def inside():
        game = factory()
        game.reset({"question": "?", "answer": "7"})
        first = as_step(game.step("#### 3"))
        last = as_step(game.step("#### 7"))
        stuck = factory()
        stuck.reset({"question": "?", "answer": "7"})
        stuck.close()  # ended by minigrpo while run() waits: cancelled and unwound
        return first, last, stuck.main

    first, last, main = asyncio.run(inside())
    assert (first.reward, first.done, last.reward, last.done) == (0.0, False, 1.0, True)
    assert main.cancelled()
