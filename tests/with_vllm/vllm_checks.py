"""One process, one colocated vLLM (CPU build): the checks of tests/with_vllm/test_vllm_cpu.py, printed as JSON.

    python tests/with_vllm/vllm_checks.py MODEL_DIR GSM8K_DIR full|lora|adapter [cpu|cuda]

(lora: LoRA merged into every push; adapter: vllm_lora_sync adapter, the base pushed once and then the adapter.)

Each check compares the vLLM backend with minigrpo's engine (the reference: fp32 on both sides) on the same model:
greedy completions, greedy with n > 1, sampled log-probs against the trainer's, per-prompt seeds, a weight push after
an update, and a push that did not arrive (the sampler check must see it).
"""

import json
import sys

import torch

from minigrpo import rollout
from minigrpo.config import Config
from minigrpo.logprobs import policy_logprobs
from minigrpo.model import load_model
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.prompts import build_prompt
from minigrpo.tasks.sources import load_examples
from minigrpo.train import SamplerCheck

model_dir, data_dir, mode = sys.argv[1:4]
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
torch.manual_seed(0)
cfg = Config(model=model_dir, use_peft=mode != "full", lora_r=8, rollout_backend="vllm", max_prompt_length=256,
             max_completion_length=48, seed=0, device=device, vllm_sleep=False,
             vllm_lora_sync="adapter" if mode == "adapter" else "merged")
model, tok = load_model(cfg)
if mode != "full":  # a trained-looking adapter: B != 0, so the push of LoRA matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
rollout.start(cfg, model, tok)
prompts = [build_prompt(tok, ex.question) for ex in load_examples(data_dir, "test", limit=3)]
greedy = SamplingParams(n=1, max_new_tokens=32, temperature=0.0)
out = {}


def both(params):
    return (rollout.generate("vllm", model, tok, prompts, params),
            rollout.generate("engine", model, tok, prompts, params))


def trainer_logprobs(ro):
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    with torch.no_grad():
        return policy_logprobs(model, ids, attention, ro.completion_ids.shape[1], 1.0)[0]


v, e = both(greedy)
out["greedy_equal"] = v.completions == e.completions and torch.equal(v.completion_ids, e.completion_ids)
out["greedy_text"] = v.completions[0]
v3, e3 = both(SamplingParams(n=3, max_new_tokens=32, temperature=0.0))
out["greedy_n3_equal"] = v3.completions == e3.completions and v3.completions[::3] == v.completions
sampled = SamplingParams(n=4, max_new_tokens=32, temperature=1.0, seeds=[11, 12, 13])
a = rollout.generate("vllm", model, tok, prompts, sampled)
b = rollout.generate("vllm", model, tok, prompts[:2], SamplingParams(**{**vars(sampled), "seeds": [11, 12]}))
out["n4_rows"] = len(a.completions)
out["n4_distinct_in_group"] = len(set(a.completions[:4]))
out["seeded_same_without_the_batch"] = a.completions[:8] == b.completions
check = SamplerCheck(cfg)
check.weights(trainer_logprobs(a), a.logprobs, a.completion_mask)
out["sampled"] = check.metrics()
out["logprobs_zero_after_the_end"] = bool((a.logprobs * (1 - a.completion_mask)).abs().sum() == 0)

# an update (any change of the weights): the next generation must follow it
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.02)
v, e = both(greedy)
out["after_update_equal"] = v.completions == e.completions
out["after_update_changed"] = v.completions[0] != out["greedy_text"]
instance = rollout.vllm._INSTANCES[id(model)]
# the path taken: with the adapter push, one adapter in vLLM, the newest (one id per push: start + 5 generations)
out["adapter_push"] = instance.adapter
if instance.adapter:
    out["lora_id"] = instance.lora_request.lora_int_id
    out["loras_in_vllm"] = sorted(instance.llm.llm_engine.list_loras())
# a push that did not arrive: vLLM samples with the old weights; the sampler check sees it
instance.push_weights = lambda model: None
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.02)
stale = rollout.generate("vllm", model, tok, prompts, sampled)
check = SamplerCheck(cfg)
check.weights(trainer_logprobs(stale), stale.logprobs, stale.completion_mask)
out["stale"] = check.metrics()
print("RESULT " + json.dumps(out))
