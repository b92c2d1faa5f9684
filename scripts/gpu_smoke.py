"""The loops on a CUDA GPU, in about 3 minutes: the default run (150 steps), LoRA + KL in bf16 (20 steps), an SFT
checkpoint and exact resume, the engine vs HF generate (greedy tokens equal; tokens/s). Prints JSON, and writes it
to $OUT/results.json when OUT is set.

    PYTHONPATH=. python scripts/gpu_smoke.py          # DEV=cpu QUICK=1 for a dry run here

On a machine without TensorBoard or matplotlib (a bare GPU image) their writer and the curves are stubbed: they are
not what this checks."""
import importlib.util
import json
import os
import shutil
import sys
import time
import types

if importlib.util.find_spec("tensorboard") is None:
    stub = types.ModuleType("torch.utils.tensorboard")
    stub.SummaryWriter = type("SummaryWriter", (), {"__init__": lambda self, **k: None,
                                                     "add_scalar": lambda self, *a: None, "close": lambda self: None})
    sys.modules["torch.utils.tensorboard"] = stub
    print("stub: tensorboard")
if importlib.util.find_spec("matplotlib") is None:
    import minigrpo.run as R
    R.plot_run = lambda run_dir, out=None: "(matplotlib missing)"
    print("stub: matplotlib")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from minigrpo.cli import main  # noqa: E402
from minigrpo.config import Config  # noqa: E402
from minigrpo.model import load_model  # noqa: E402
from minigrpo.rollout.engine import engine_generate  # noqa: E402
from minigrpo.rollout.hf import hf_generate  # noqa: E402
from minigrpo.rollout.types import SamplingParams  # noqa: E402
from minigrpo.sft import sft  # noqa: E402
from minigrpo.tasks.prompts import render_prompts  # noqa: E402
from minigrpo.tasks.sources import load_split  # noqa: E402
from minigrpo.train import train  # noqa: E402

DEV = os.environ.get("DEV", "cuda")
QUICK = os.environ.get("QUICK") == "1"
ROOT = os.environ.get("ROOT", "/tmp/gpu_smoke")
NAME = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
results = {"device": NAME, "torch": torch.__version__}
shutil.rmtree(ROOT, ignore_errors=True)


def summary(run):
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(r["perf/step_s"] for r in rows if "perf/step_s" in r)
    return {"before": s["before"].get("eval/accuracy"), "after": s["after"].get("eval/accuracy"),
            "median_step_s": steps[len(steps) // 2], "peak_gb": max(r.get("memory/peak_gb", 0) for r in rows)}


t = time.perf_counter()
run = train(Config(device=DEV, max_steps=3 if QUICK else 150, eval_steps=0, logging_steps=50,
                   output_dir=f"{ROOT}/default"), show_progress=False)
results["default_150_steps"] = summary(run) | {"wall_s": round(time.perf_counter() - t, 1)}

t = time.perf_counter()
run = train(Config(device=DEV, dtype="bfloat16", use_peft=True, beta=0.04, learning_rate=5e-4,
                   max_steps=3 if QUICK else 20, eval_steps=0, logging_steps=10, save_steps=10,
                   output_dir=f"{ROOT}/lora"), show_progress=False)
results["lora_bf16_kl_20_steps"] = summary(run) | {"wall_s": round(time.perf_counter() - t, 1)}

sft_args = dict(device=DEV, model="tiny-arith-init", max_steps=6, save_steps=3, eval_limit=50, eval_steps=0,
                per_device_train_batch_size=6, learning_rate=3e-3, arith_train_size=200)
a = sft(Config(**sft_args, output_dir=f"{ROOT}/sft_a"), show_progress=False)
shutil.copytree(a, f"{ROOT}/sft_b")
shutil.rmtree(f"{ROOT}/sft_b/checkpoint-6")
shutil.rmtree(f"{ROOT}/sft_b/model")
code = main(["sft", "--resume", f"{ROOT}/sft_b"])  # from checkpoint-3
wa, wb = load_file(f"{a}/model/model.safetensors"), load_file(f"{ROOT}/sft_b/model/model.safetensors")
diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
results["sft_resume"] = {"exit": code, "max_abs_weight_diff": diff, "bit_identical": diff == 0.0}

cfg = Config(device=DEV)
model, tok = load_model(cfg)
prompts = render_prompts(cfg, tok, load_split(cfg, "test", 64))
greedy = SamplingParams(n=1, max_new_tokens=64, temperature=0.0)
same = torch.equal(engine_generate(model, tok, prompts, greedy).completion_ids,
                   hf_generate(model, tok, prompts, greedy).completion_ids)
rates = {"engine": [], "hf": []}
for rep in range(4):
    for name, fn in (("engine", engine_generate), ("hf", hf_generate)):
        torch.manual_seed(rep)
        sync()
        t = time.perf_counter()
        ro = fn(model, tok, prompts[:16], SamplingParams(n=8, max_new_tokens=64))
        sync()
        if rep:  # the first round warms up
            rates[name].append(ro.num_completion_tokens / (time.perf_counter() - t))
med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
results["rollout_tiny_arith_16x8"] = {"greedy_tokens_equal_hf": same, "engine_tok_s": round(med["engine"]),
                                      "hf_tok_s": round(med["hf"]), "ratio": round(med["engine"] / med["hf"], 2)}
print(json.dumps(results, indent=2))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "results.json"), "w") as f:
        f.write(json.dumps(results, indent=2))
