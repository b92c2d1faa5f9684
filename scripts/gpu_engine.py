"""Issue 23's GPU check, in about 2 minutes: the rollout engine against HF `generate` on random-init models of
Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes (built from their configs: no weights travel to a lent GPU), 4 prompts x
8 samples = 32 sequences of up to 128 tokens, bfloat16 on CUDA. Per model: tokens/s of each (interleaved
repetitions, `minigrpo bench rollout`'s harness), the matrix-work roofline and each one's fraction of it, whether
greedy tokens agree, and peak memory. Prints JSON, and writes it to $OUT/engine.json when OUT is set.

    PYTHONPATH=. python scripts/gpu_engine.py          # DEV=cpu QUICK=1 for a dry run here (tiny shapes)

A random model's answers run to the length limit (its EOS is one token of 151936): every row decodes 128 tokens.
"""
import json
import os
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from minigrpo.rollout.engine import engine_generate
from minigrpo.rollout.hf import hf_generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.arith import arith_rows
from minigrpo.tiny import arith_tokenizer
from minigrpo.tools.bench import bench_rollout

QUICK = os.environ.get("QUICK") == "1"
DEV = torch.device(os.environ.get("DEV", "cuda"))
DTYPE = torch.bfloat16 if DEV.type == "cuda" else torch.float32
# the published configs' shapes (Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen2.5-1.5B-Instruct config.json)
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6),
}
if QUICK:
    SHAPES = {"tiny-qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)}


def main() -> dict:
    tok = arith_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in arith_rows("test", 4)]
    tokens = 16 if QUICK else 128
    report = {"device": torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu", "dtype": str(DTYPE),
              "torch": torch.__version__, "sequences": 32, "max_new_tokens": tokens, "models": {}}
    for name, shape in SHAPES.items():
        t0 = time.perf_counter()
        config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        with torch.device(DEV):
            model = Qwen2ForCausalLM(config).to(DTYPE).eval()
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats(DEV)
        speed = bench_rollout(model, tok, prompts, n=8, max_new_tokens=tokens, reps=1 if QUICK else 3)
        greedy = SamplingParams(n=1, max_new_tokens=32, temperature=0.0)
        ours, ref = engine_generate(model, tok, prompts, greedy), hf_generate(model, tok, prompts, greedy)
        same = (ours.completion_ids == ref.completion_ids).float().mean().item() \
            if ours.completion_ids.shape == ref.completion_ids.shape else 0.0
        report["models"][name] = {
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "speed": speed,
            "greedy_tokens_equal_fraction": same,
            "peak_gb": torch.cuda.max_memory_allocated(DEV) / 2**30 if DEV.type == "cuda" else None,
            "seconds": time.perf_counter() - t0}
        print(name, json.dumps({k: v for k, v in report["models"][name].items() if k != "speed"}),
              {k: round(v["median_tokens_per_s"], 1) for k, v in speed.items() if isinstance(v, dict)
               and "median_tokens_per_s" in v}, flush=True)
        del model
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    out = main()
    print(json.dumps(out, indent=2))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine.json"), "w") as f:
            json.dump(out, f, indent=2)
