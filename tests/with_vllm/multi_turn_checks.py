"""One process, one colocated vLLM (CPU build): multi-turn rollouts on vLLM against minigrpo's engine, printed as
JSON (tests/with_vllm/test_vllm_cpu.py::test_multi_turn_on_vllm).

    python tests/with_vllm/multi_turn_checks.py

On the shipped tools model (minigrpo/assets/tiny-arith-tools, fp32 on both sides): greedy trajectories with an
environment answering each turn (the built-in `retry`: a miss gets "N is not right. Try again." and another turn)
equal the engine's, token for token, tool mask and stats included; sampled trajectories with the calculator (about a
quarter call it at T = 1) carry vLLM's log-probs of the generated tokens, which match the trainer's, and 0 on the
tokens the tools and the chat template added.
"""

import json
from pathlib import Path

import torch

from minigrpo import rollout
from minigrpo.agent.env import Retry
from minigrpo.agent.tools import calculator
from minigrpo.agent.turns import MultiTurn
from minigrpo.config import Config
from minigrpo.logprobs import policy_logprobs
from minigrpo.model import load_model
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.arith import arith_rows
from minigrpo.train import SamplerCheck

ASSET = Path(__file__).parents[2] / "minigrpo" / "assets" / "tiny-arith-tools"
torch.manual_seed(0)
cfg = Config(model=str(ASSET), rollout_backend="vllm", max_prompt_length=96, max_completion_length=64, seed=0,
             device="cpu", vllm_sleep=False, tools=["calculator"])
model, tok = load_model(cfg)
rollout.start(cfg, model, tok)
rows = arith_rows("test", 8, steps=1, max_number=999)
prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                   add_generation_prompt=True) for r in rows]
golds = [{"answer": r["answer"].rsplit("#### ", 1)[1]} for r in rows]
out = {}


def untimed(stats):
    return {k: v for k, v in stats.items() if not k.endswith("_s")}


retry = MultiTurn(environment=Retry, max_turns=3).bound(golds, 2)
greedy = SamplingParams(n=2, max_new_tokens=48, temperature=0.0, turns=retry)
v, e = (rollout.generate(b, model, tok, prompts, greedy) for b in ("vllm", "engine"))
out["greedy_equal"] = (v.completions == e.completions and torch.equal(v.completion_ids, e.completion_ids)
                       and torch.equal(v.tool_mask, e.tool_mask) and untimed(v.stats) == untimed(e.stats)
                       and v.truncated.tolist() == e.truncated.tolist())
out["greedy_turns"] = v.stats["turns"]
out["greedy_text"] = v.completions[0]

sampled = SamplingParams(n=4, max_new_tokens=48, temperature=1.0, seeds=list(range(len(prompts))),
                         turns=MultiTurn(tools=[calculator], max_turns=2))
a = rollout.generate("vllm", model, tok, prompts, sampled)
b = rollout.generate("vllm", model, tok, prompts[:3], SamplingParams(**{**vars(sampled), "seeds": [0, 1, 2]}))
out["seeded_same_without_the_batch"] = a.completions[:12] == b.completions
out["tool_calls"] = sum(a.stats["tool_calls"])
out["tool_errors"] = sum(a.stats["tool_errors"])
out["tool_tokens"] = int(a.tool_mask.sum())
out["logprobs_zero_off_the_generated_tokens"] = bool((a.logprobs * (1 - a.generated_mask)).abs().sum() == 0)
ids = torch.cat([a.prompt_ids, a.completion_ids], 1)
attention = torch.cat([a.prompt_mask, a.completion_mask.long()], 1)
with torch.no_grad():
    trainer = policy_logprobs(model, ids, attention, a.completion_ids.shape[1], 1.0)[0]
check = SamplerCheck(cfg)
check.weights(trainer, a.logprobs, a.generated_mask)
out["sampled"] = check.metrics()
print("RESULT " + json.dumps(out))
