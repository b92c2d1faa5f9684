"""`minigrpo bench rollout`: the rollout engine vs transformers' generate (and vLLM with --vllm), same model,
prompts and sampling.

Repetitions are interleaved (engine, hf, engine, hf, ...) in one process so machine noise hits both alike;
the report gives the median tokens/s of each, the spread (min-max) and the ratio of medians.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from minigrpo.compat import drop_gguf_marker
from minigrpo.config import Config
from minigrpo.model import load_tokenizer, resolve_model_path
from minigrpo.monitor import peak_memory_gb, peak_rss_bytes, read_jsonl
from minigrpo.rollout import engine, hf
from minigrpo.rollout.decode import product_layout, products
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.prompts import render_prompts
from minigrpo.tasks.rewards import correctness_reward
from minigrpo.tasks.sources import load_split


def matmul_roofline(model: torch.nn.Module, rows: int, dtype: str | None = None, reps: int = 3) -> dict[str, float]:
    """The matrix work of one decode step of `model` at `rows` sequences, timed on this machine: every Linear
    weight (the LM head included, once) multiplied by a [rows, in] input in turn, as a step streams them from
    memory, in `dtype` (None: the weights' own), with the fastest kernel the engine uses for them; the fastest of
    `reps` passes. What a decode step could reach if
    the matrix products were all it did: `tokens_per_s` = rows / that time. Attention, sampling, norms and
    Python are what an engine adds on top; `bench_rollout` reports each backend's fraction of this."""
    target = getattr(torch, dtype) if dtype else None
    layers = []  # the model's Linear layers' weights (in `dtype`), without biases
    for m in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        layers.append(torch.nn.Linear(m.in_features, m.out_features, bias=False, device="meta"))
        layers[-1].weight = torch.nn.Parameter(m.weight.detach().to(target or m.weight.dtype), requires_grad=False)
    # the kernel the engine's decode step uses for them (rollout/decode.product_layout): MKL's packed GEMM for
    # float32 weights streamed from memory on a CPU, a plain [in, out] copy for ones that stay in cache, else F.linear
    layout = product_layout([layer.weight for layer in layers], fast=True)
    with torch.no_grad():
        calls = [(products([layer], layout, rows), layer.in_features) for layer in layers]
    kernel = {"packed": "mkl packed", "transposed": "mm [in, out]", "plain": "linear"}[layout]
    first = layers[0].weight
    inputs = {k: torch.randn(rows, k, dtype=first.dtype, device=first.device) for _, k in calls}
    flops = sum(2 * layer.weight.numel() for layer in layers)  # per token
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):  # the first pass warms up
            if first.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for call, k in calls:
                call(inputs[k])
            if first.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return {"rows": rows, "flops_per_token": flops, "step_s": best, "gflops": flops * rows / best / 1e9,
            "tokens_per_s": rows / best, "dtype": str(first.dtype).removeprefix("torch."), "kernel": kernel}


def bench_rollout(model: Any, tokenizer: Any, prompts: list[str], n: int, max_new_tokens: int, reps: int = 5,
                  temperature: float = 1.0, warmup: int = 1, vllm: bool = False, turns: Any = None,
                  weights_dtype: str | None = None) -> dict[str, Any]:
    """Tokens/s of each backend over `reps` interleaved repetitions (seeded identically per repetition). With
    `vllm` (its colocated instance started for `model`: rollout.vllm.start), vLLM too: its time includes the
    weight push every generation pays (reported apart as vllm_push_s). `turns` (agent.turns.MultiTurn): multi-turn
    rollouts with tools, the engine's loop against the HF reference loop (and vLLM's); the tokens counted are the whole
    trajectories' (tool answers included: every backend feeds them through the model), and the report adds the
    tool calls per sample. `weights_dtype`: the engine and hf sample with the weights in it (vLLM runs in the dtype
    it was started with). The report adds the matrix-work roofline (`matmul_roofline`) and each backend's
    fraction of it."""
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, turns=turns,
                            weights_dtype=weights_dtype)
    backends = {"engine": engine.generate, "hf": hf.generate}  # with what they do around it (the weights' dtype)
    if vllm:
        from minigrpo.rollout import vllm as vllm_backend  # only with --vllm: it imports vllm on use

        backends["vllm"] = vllm_backend.generate
        instance = vllm_backend.instance(model)
    rates: dict[str, list[float]] = {k: [] for k in backends}
    calls: dict[str, list[float]] = {k: [] for k in backends}
    pushes: list[float] = []
    unpushed: list[float] = []  # vLLM's tokens/s without its weight push
    for rep in range(warmup + reps):
        for name, fn in backends.items():
            torch.manual_seed(rep)
            t0 = time.perf_counter()
            ro = fn(model, tokenizer, prompts, params)
            seconds = time.perf_counter() - t0
            if rep >= warmup:
                rates[name].append(ro.num_completion_tokens / seconds)  # real tokens, up to each EOS
                if ro.stats:
                    calls[name].append(sum(ro.stats["tool_calls"]) / len(ro.stats["tool_calls"]))
                if name == "vllm":
                    pushes.append(instance.push_s)
                    unpushed.append(ro.num_completion_tokens / (seconds - instance.push_s))
    roof = matmul_roofline(model, len(prompts) * n, weights_dtype)
    report: dict[str, Any] = {"roofline": roof}
    for name, values in rates.items():
        report[name] = {"median_tokens_per_s": statistics.median(values), "min": min(values), "max": max(values),
                        "roofline_fraction": statistics.median(values) / roof["tokens_per_s"]}
        if calls[name]:
            report[name]["tool_calls_per_sample"] = statistics.mean(calls[name])
    median = {name: report[name]["median_tokens_per_s"] for name in backends}
    report["ratio_engine_over_hf"] = median["engine"] / median["hf"]
    if vllm:
        report["ratio_vllm_over_hf"] = median["vllm"] / median["hf"]
        report["ratio_engine_over_vllm"] = median["engine"] / median["vllm"]
        report["vllm_push_s"] = statistics.median(pushes)
        report["vllm"]["median_tokens_per_s_without_push"] = statistics.median(unpushed)
        report["ratio_engine_over_vllm_without_push"] = median["engine"] / statistics.median(unpushed)
    return report


# ---- `minigrpo bench trl`: minigrpo vs TRL's GRPOTrainer, same settings ------------------------------------------
#
# Each run is a fresh spawned process (so ru_maxrss is that framework's own peak RSS); runs are interleaved
# (trl, minigrpo, trl, minigrpo, ...) so machine noise hits both alike. The first step of each run is warm-up
# and left out of the medians.

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


VLLM_MEMORY = 0.3  # share of GPU memory each framework's colocated vLLM takes (sleep mode off in both)


def _peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def _peak_gpu_gb() -> float:
    return peak_memory_gb(torch.device("cuda")) if torch.cuda.is_available() else 0.0


def _minigrpo_config(s: dict[str, Any], beta: float, output_dir: str | None) -> Any:
    return Config(model=s["model"], gguf_file=s["gguf_file"], use_peft=True, lora_r=16, lora_alpha=32,
                  lora_dropout=0.0, lora_target_modules=list(LORA_TARGETS), gradient_checkpointing=False,
                  dtype=s.get("dtype", "float32"), device=s.get("device", "cpu"), beta=beta, learning_rate=s["lr"],
                  rollout_backend=s.get("backend") or ("vllm" if s.get("vllm") else "engine"), vllm_sleep=False,
                  vllm_lora_sync=s.get("lora_sync", "merged"),
                  vllm_gpu_memory_utilization=VLLM_MEMORY,
                  num_generations=s["num_generations"],
                  per_device_train_batch_size=s["num_generations"] * s["prompts_per_step"],
                  max_completion_length=s["max_completion_length"], max_steps=s["steps"], eval_limit=0,
                  eval_steps=0, seed=s["seed"], output_dir=output_dir, num_threads=s["threads"],
                  logging_steps=max(s["steps"], 1), arith_train_size=s["train_size"],
                  dataset=s.get("data", "arith"))


def _run_minigrpo(s: dict[str, Any], beta: float) -> dict[str, Any]:
    """One minigrpo run (in a fresh process): per-step seconds and completion tokens/s from metrics.jsonl."""
    torch.set_num_threads(s["threads"])
    from minigrpo.train import train  # here: only this child runs minigrpo's loop (its own peak RSS)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_dir = train(_minigrpo_config(s, beta, str(Path(tmp) / "run")), show_progress=False)
        run_s = time.perf_counter() - t0
        rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    rows = [r for r in rows if "perf/step_s" in r]
    return {"step_s": [r["perf/step_s"] for r in rows], "tokens_per_s": [r["perf/tokens_per_s"] for r in rows],
            "generate_s": [r["perf/generate_s"] for r in rows],
            "mean_length": [r["completions/mean_length"] for r in rows], "run_s": run_s,
            "peak_rss_mb": _peak_rss_mb(), "peak_gpu_gb": _peak_gpu_gb()}


def _run_trl(s: dict[str, Any], beta: float) -> dict[str, Any]:
    """One TRL GRPOTrainer run (in a fresh process), timed per step by a callback."""
    torch.set_num_threads(s["threads"])
    # here: TRL is optional (the bench extra), and only this child loads it
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    t0 = time.perf_counter()
    cfg = _minigrpo_config(s, beta, None)  # its hyperparameters only: no folder
    path = resolve_model_path(s["model"])
    tok = AutoTokenizer.from_pretrained(path, gguf_file=s["gguf_file"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=s["gguf_file"], dtype=getattr(torch, cfg.dtype))
    # The same prompt text as minigrpo (chat template + system prompt), passed as plain text so the reward
    # gets completion strings; the token ids equal those of TRL's own chat-template path.
    examples = load_split(cfg, "train")
    rows = [{"prompt": prompt, "answer": ex.columns["answer"]}
            for prompt, ex in zip(render_prompts(cfg, tok, examples), examples)]
    G, B = s["num_generations"], s["num_generations"] * s["prompts_per_step"]

    def correctness(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
        return correctness_reward(prompts, completions, answer)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.lengths: dict[int, float] = {}
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step_s.append(time.perf_counter() - self.started)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.lengths[state.global_step] = logs["completions/mean_length"]

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=cfg.device == "cpu", bf16=cfg.dtype == "bfloat16", fp16=False,
            gradient_checkpointing=False, seed=s["seed"], use_vllm=bool(s.get("vllm")), vllm_mode="colocate",
            vllm_gpu_memory_utilization=VLLM_MEMORY, vllm_enable_sleep_mode=False,
            data_seed=s["seed"], per_device_train_batch_size=B, gradient_accumulation_steps=1,
            num_generations=G, max_completion_length=s["max_completion_length"], temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, beta=beta, epsilon=cfg.epsilon, num_iterations=cfg.num_iterations,
            loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, mask_truncated_completions=False,
            learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm,
            optim="adamw_torch", max_steps=s["steps"], logging_steps=1, report_to="none", save_strategy="no",
            disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model, processing_class=tok, reward_funcs=[correctness], args=args,
            train_dataset=Dataset.from_list(rows), callbacks=[timer],
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                   target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
        trainer.train()
        run_s = time.perf_counter() - t0
    lengths = [timer.lengths.get(i + 1, float("nan")) for i in range(len(timer.step_s))]
    return {"step_s": timer.step_s, "tokens_per_s": [n * B / t for n, t in zip(lengths, timer.step_s)],
            "mean_length": lengths, "run_s": run_s, "peak_rss_mb": _peak_rss_mb(), "peak_gpu_gb": _peak_gpu_gb()}


RUNNERS = {"trl": _run_trl, "minigrpo": _run_minigrpo}


def _child(name: str, settings: dict[str, Any], beta: float, queue: Any) -> None:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # trainers' log lines must not mix with the JSON report
            result = RUNNERS[name](settings, beta)
        queue.put(("ok", result))
    except BaseException as e:  # report the failure to the parent instead of hanging it
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_isolated(name: str, settings: dict[str, Any], beta: float) -> dict[str, Any]:
    """Run one framework's training in a fresh spawned process; its own peak RSS comes back with the times."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, settings, beta, queue))
    proc.start()
    status, result = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{name} run failed:\n{result}")
    return result


def _summary(runs: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    step_s = [t for r in runs for t in r["step_s"][warmup_steps:]]
    tps = [t for r in runs for t in r["tokens_per_s"][warmup_steps:] if t == t]  # drop NaN
    lengths = [n for r in runs for n in r["mean_length"][warmup_steps:] if n == n]
    return {"median_step_s": statistics.median(step_s), "min_step_s": min(step_s), "max_step_s": max(step_s),
            "median_tokens_per_s": statistics.median(tps) if tps else float("nan"),
            "mean_completion_length": statistics.fmean(lengths) if lengths else float("nan"),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "peak_gpu_gb": statistics.median(r.get("peak_gpu_gb", 0.0) for r in runs),
            "median_run_s": statistics.median(r["run_s"] for r in runs), "timed_steps": len(step_s)}


# `bench trl --workload`: named shapes of a step, each run for every beta. "default" is the flags as given (the
# favourable case: tiny-arith, G 8 x 4 prompts, answers that end early); the others override them.
WORKLOADS: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {"num_generations": 4, "prompts_per_step": 2},  # 8 completions a step: little to batch
    # a random tiny Qwen2 (arith vocabulary): almost every completion runs to the length limit
    "random-qwen2": {"model": "random-qwen2", "num_generations": 4, "prompts_per_step": 2},
}


def random_qwen2(out: str, seed: int = 0) -> str:
    """A seeded random Qwen2 (hidden 128, 4 layers, 4 heads over 2 KV heads) with the arith tokenizer, saved
    under `out` for both frameworks to load: a model of another architecture whose answers never end early."""
    from transformers import Qwen2Config, Qwen2ForCausalLM  # here: only this workload builds one

    from minigrpo.tiny import arith_tokenizer

    tok = arith_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def bench_trl(model: str = "tiny-arith", gguf_file: str | None = None, steps: int = 10, num_generations: int = 8,
              prompts_per_step: int = 4, max_completion_length: int = 64, betas: tuple[float, ...] = (0.04, 0.0),
              lr: float = 1e-4, seed: int = 42, reps: int = 2, threads: int = 1, train_size: int = 2000,
              warmup_steps: int = 1, data: str = "arith", device: str = "cpu", dtype: str = "float32",
              vllm: tuple[bool, ...] = (False,), log: Any = None, workloads: tuple[str, ...] = ("default",),
              ) -> dict[str, Any]:
    """minigrpo vs TRL GRPOTrainer, identical settings, interleaved isolated runs; medians and ratios per variant.

    Variants: each workload (WORKLOADS), times each beta, times each vllm choice (False: each framework's own
    generation; True: each one's colocated vLLM). Results are keyed by the beta ("0.04"), "0.04 vllm" /
    "0.04 no-vllm" when vllm is varied, prefixed by the workload ("small 0.04") when several are given.
    """
    settings = {"model": model, "gguf_file": None, "steps": steps, "num_generations": num_generations,
                "prompts_per_step": prompts_per_step, "max_completion_length": max_completion_length, "lr": lr,
                "seed": seed, "threads": threads, "train_size": train_size, "data": data, "device": device,
                "dtype": dtype}
    report: dict[str, Any] = {"results": {}}
    with contextlib.ExitStack() as stack:
        if gguf_file:  # TRL's Trainer refuses GGUF-loaded models (quantized): both load one dequantized fp32 copy
            settings["model"] = _dequantized_copy(model, gguf_file, stack.enter_context(tempfile.TemporaryDirectory()))
        for workload in workloads:
            given = settings | WORKLOADS[workload]
            if given["model"] == "random-qwen2":
                given["model"] = random_qwen2(stack.enter_context(tempfile.TemporaryDirectory()), seed)
            part = _bench_trl(given, betas, vllm, reps, warmup_steps,
                              None if log is None else lambda line, w=workload: log(f"{w}: {line}"))
            prefix = "" if len(workloads) == 1 else f"{workload} "
            report["results"] |= {prefix + k: v for k, v in part["results"].items()}
            report.setdefault("workloads", {})[workload] = {"model": WORKLOADS[workload].get("model", model)} | {
                k: given[k] for k in ("num_generations", "prompts_per_step", "max_completion_length")}
            report["settings"] = part["settings"] | {k: settings[k] for k in ("num_generations", "prompts_per_step",
                                                                              "max_completion_length")}
    report["settings"] |= {"model": model, "gguf_file": gguf_file, "workloads": list(workloads)}
    return {"settings": report.pop("settings")} | report


def _dequantized_copy(model: str, gguf_file: str, out: str) -> str:
    """Save the model of a GGUF file as plain safetensors (with its tokenizer) under `out`."""
    drop_gguf_marker(AutoModelForCausalLM.from_pretrained(resolve_model_path(model), gguf_file=gguf_file,
                                                          dtype=torch.float32)).save_pretrained(out)
    load_tokenizer(Config(model=model, gguf_file=gguf_file)).save_pretrained(out)
    return out


def _bench_trl(settings: dict[str, Any], betas: tuple[float, ...], vllm: tuple[bool, ...], reps: int,
               warmup_steps: int, log: Any) -> dict[str, Any]:
    def key(beta: float, v: bool) -> str:
        return str(beta) if vllm == (False,) else f"{beta} {'vllm' if v else 'no-vllm'}"

    variants = [(beta, v) for beta in betas for v in vllm]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {key(b, v): {"trl": [], "minigrpo": []} for b, v in variants}
    for rep in range(reps):
        for beta, v in variants:
            for name in ("trl", "minigrpo"):
                result = run_isolated(name, settings | {"vllm": v}, beta)
                runs[key(beta, v)][name].append(result)
                if log:
                    log(f"rep {rep + 1}/{reps} {key(beta, v)} {name}: median step "
                        f"{statistics.median(result['step_s'][warmup_steps:] or result['step_s']):.3f} s, "
                        f"peak RSS {result['peak_rss_mb']:.0f} MB")
    report: dict[str, Any] = {"settings": settings | {"betas": list(betas), "vllm": list(vllm), "reps": reps,
                                                      "warmup_steps_dropped": warmup_steps}, "results": {}}
    for name, by_framework in runs.items():
        trl, mini = _summary(by_framework["trl"], warmup_steps), _summary(by_framework["minigrpo"], warmup_steps)
        report["results"][name] = {
            "trl": trl, "minigrpo": mini,
            "ratio_minigrpo_over_trl": {
                "step_s": mini["median_step_s"] / trl["median_step_s"],
                "tokens_per_s": mini["median_tokens_per_s"] / trl["median_tokens_per_s"],
                "peak_rss": mini["peak_rss_mb"] / trl["peak_rss_mb"]}}
    return report


# ---- `minigrpo bench step`: a whole GRPO step of minigrpo with each rollout backend ---------------------------

def step_settings(name: str) -> dict[str, str]:
    """A `bench step` backend name (a rollout backend, or vllm-adapter) as run settings."""
    backend, _, sync = name.partition("-")
    return {"backend": backend, "lora_sync": sync or "merged"}


def bench_step(model: str = "tiny-arith", gguf_file: str | None = None, backends: tuple[str, ...] = ("engine", "hf"),
               steps: int = 5, num_generations: int = 8, prompts_per_step: int = 4, max_completion_length: int = 64,
               beta: float = 0.04, lr: float = 1e-4, seed: int = 42, reps: int = 2, threads: int = 1,
               train_size: int = 2000, warmup_steps: int = 1, data: str = "arith", device: str = "cpu",
               dtype: str = "float32", log: Any = None) -> dict[str, Any]:
    """minigrpo's whole step (generate, score, train) with each rollout backend: the same settings as `bench trl`
    (LoRA r16 on q/k/v/o), isolated runs interleaved (engine, hf, vllm, ..., engine, ...); median step and
    generation times, and each backend's step time over the first backend's. vllm pushes LoRA merged into every
    weight, vllm-adapter the adapter only (vllm_lora_sync)."""
    settings = {"model": model, "gguf_file": gguf_file, "steps": steps, "num_generations": num_generations,
                "prompts_per_step": prompts_per_step, "max_completion_length": max_completion_length, "lr": lr,
                "seed": seed, "threads": threads, "train_size": train_size, "data": data, "device": device,
                "dtype": dtype}
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for rep in range(reps):
        for b in backends:
            result = run_isolated("minigrpo", settings | step_settings(b), beta)
            runs[b].append(result)
            if log:
                log(f"rep {rep + 1}/{reps} {b}: median step "
                    f"{statistics.median(result['step_s'][warmup_steps:] or result['step_s']):.3f} s, generation "
                    f"{statistics.median(result['generate_s'][warmup_steps:] or result['generate_s']):.3f} s")
    results = {}
    for b, rs in runs.items():
        generate_s = [t for r in rs for t in r["generate_s"][warmup_steps:]]
        results[b] = _summary(rs, warmup_steps) | {"median_generate_s": statistics.median(generate_s)}
    first = results[backends[0]]
    for b in backends:
        results[b][f"step_s_over_{backends[0]}"] = results[b]["median_step_s"] / first["median_step_s"]
    return {"settings": settings | {"beta": beta, "backends": list(backends), "reps": reps,
                                    "warmup_steps_dropped": warmup_steps, "lora": "r16 alpha32 on q/k/v/o"},
            "results": results}


# ---- `minigrpo bench overlap`: overlapped rollouts (max_staleness k) against the synchronous loop -------------

class _Timeline:
    """A run's callback: seconds since the trainer was made at each held-out evaluation."""

    def __init__(self) -> None:
        self.t0, self.evals = time.perf_counter(), []

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        self.evals.append((step, time.perf_counter() - self.t0, metrics))


def _run_train(s: dict[str, Any], beta: float) -> dict[str, Any]:
    """One `minigrpo train` (in a fresh process) with the config `s["config"]`: step times from metrics.jsonl, the
    held-out metric at each evaluation with the wall time it was reached, and the whole run's seconds."""
    from minigrpo.api import GRPOTrainer  # here: only this child trains
    from minigrpo.run import headline  # here: as above

    timeline = _Timeline()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(**s["config"], output_dir=str(Path(tmp) / "run"))
        GRPOTrainer(args=cfg, callbacks=[timeline]).train()
        run_s = time.perf_counter() - timeline.t0
        rows = [r for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl") if "perf/step_s" in r]
    evals = [(step, seconds, headline(metrics)[1]) for step, seconds, metrics in timeline.evals if headline(metrics)]
    return {"step_s": [r["perf/step_s"] for r in rows], "generate_s": [r["perf/generate_s"] for r in rows],
            "wait_s": [r.get("perf/wait_s", 0.0) for r in rows], "evals": evals, "run_s": run_s}


RUNNERS["train"] = _run_train


def bench_overlap(config: dict[str, Any], max_staleness: int = 1, seeds: tuple[int, ...] = (1, 2, 3),
                  target: float | None = None, warmup_steps: int = 1, log: Any = None) -> dict[str, Any]:
    """The synchronous loop (max_staleness 0) and overlapped rollouts (k = max_staleness) on the same config, one
    fresh process per run, interleaved (seed 1 sync, seed 1 overlapped, seed 2 ...): median step time, wall time
    (since the trainer was made: set-up and evaluations included) to the first held-out evaluation reaching `target`
    (default: the lowest final figure over the synchronous runs), and the final held-out figure; ratios of medians."""
    modes = {"sync": 0, f"k{max_staleness}": max_staleness}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for seed in seeds:
        for mode, k in modes.items():
            result = run_isolated("train", {"config": config | {"seed": seed, "max_staleness": k}}, 0.0)
            runs[mode].append(result)
            if log:
                log(f"seed {seed} {mode}: median step {statistics.median(result['step_s'][warmup_steps:]):.3f} s, "
                    f"run {result['run_s']:.1f} s, held-out {[round(v, 3) for _, _, v in result['evals']]}")
    evaluated = all(r["evals"] for rs in runs.values() for r in rs)  # eval_limit 0: speed only
    if target is None and evaluated:
        target = min(r["evals"][-1][2] for r in runs["sync"])

    def reached(r: dict[str, Any]) -> float:  # seconds to the first evaluation at or above the target
        return next((t for _, t, v in r["evals"] if target is not None and v >= target), float("nan"))

    results = {}
    for mode, rs in runs.items():
        step_s = [t for r in rs for t in r["step_s"][warmup_steps:]]
        to_target = [reached(r) for r in rs]
        results[mode] = {"median_step_s": statistics.median(step_s), "min_step_s": min(step_s),
                         "max_step_s": max(step_s),
                         "median_generate_s": statistics.median(t for r in rs for t in r["generate_s"][warmup_steps:]),
                         "median_wait_s": statistics.median(t for r in rs for t in r["wait_s"][warmup_steps:]),
                         "s_to_target": to_target, "median_s_to_target": statistics.median(to_target),
                         "final": [r["evals"][-1][2] if evaluated else float("nan") for r in rs],
                         "run_s": [r["run_s"] for r in rs],
                         "evals": [[(step, round(t, 1), v) for step, t, v in r["evals"]] for r in rs]}
    sync, over = results["sync"], results[f"k{max_staleness}"]
    ratios = {"step_s": over["median_step_s"] / sync["median_step_s"],
              "s_to_target": over["median_s_to_target"] / sync["median_s_to_target"],
              "run_s": statistics.median(over["run_s"]) / statistics.median(sync["run_s"]),
              "final_points": 100 * (statistics.median(over["final"]) - statistics.median(sync["final"]))}
    return {"settings": {"config": config, "max_staleness": max_staleness, "seeds": list(seeds), "target": target,
                         "warmup_steps_dropped": warmup_steps},
            "results": results, "overlapped_over_sync": ratios}


# The comparison of issue 22: name -> the keys that differ from the base config. The surrogates and options all act
# through the ratio, which is exactly 1 when each batch is used once on-policy: the base trains num_iterations 2.
ALGO_VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla (dapo)": {},
    "loss_type grpo": {"loss_type": "grpo"},
    "Dr. GRPO": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "GSPO": {"importance_sampling_level": "sequence"},
    "LUSPO": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "CISPO (eps_high 5)": {"loss_mode": "cispo", "epsilon_high": 5.0},
    "SAPO": {"loss_mode": "sapo"},
    "VESPO": {"loss_mode": "vespo"},
    "delta 1.5 (eps_high 0.28)": {"epsilon_high": 0.28, "delta": 1.5},
    "beta 0.04 (k3)": {"beta": 0.04},
    "beta 0.04 unbiased KL": {"beta": 0.04, "use_bias_correction_kl": True},
    "entropy bonus 0.01": {"entropy_coef": 0.01},
    "adaptive entropy (target 0.2)": {"use_adaptive_entropy": True},
    "top 20 pct entropy tokens": {"top_entropy_quantile": 0.2},
    "off-policy mask 0.5": {"off_policy_mask_threshold": 0.5},
    "RLOO": {"adv_estimator": "rloo"},
    "REINFORCE++": {"adv_estimator": "reinforce_plus_plus"},
    "REINFORCE++ baseline": {"adv_estimator": "reinforce_plus_plus_baseline"},
    "GRPO pass@k": {"adv_estimator": "grpo_passk"},
    "2 rewards: sum then normalise": {"reward_funcs": ["correctness", "format_strict"]},
    "2 rewards: GDPO": {"reward_funcs": ["correctness", "format_strict"],
                        "multi_objective_aggregation": "normalize_then_sum"},
}


def bench_algo(config: dict[str, Any], variants: dict[str, dict[str, Any]], seeds: tuple[int, ...] = (1, 2, 3),
               log: Any = None) -> dict[str, Any]:
    """Each variant (keys over `config`) once per seed, each run in a fresh process, interleaved (seed 1: every
    variant, then seed 2, ...: drifts of the machine's load fall on all alike): the held-out figure after the run
    (per seed, and the median at every evaluation step), median wall time of a run (set-up and evaluations
    included) and its ratio to the first variant's, median step time."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for seed in seeds:
        for name, keys in variants.items():
            result = run_isolated("train", {"config": config | keys | {"seed": seed}}, 0.0)
            runs[name].append(result)
            if log:
                log(f"seed {seed} {name}: held-out {result['evals'][-1][2] if result['evals'] else None}, "
                    f"run {result['run_s']:.1f} s")
    first = next(iter(variants))
    base_s = statistics.median(r["run_s"] for r in runs[first])
    results = {}
    for name, rs in runs.items():
        finals = [r["evals"][-1][2] if r["evals"] else float("nan") for r in rs]
        steps = sorted({step for r in rs for step, _, _ in r["evals"]})
        at = {step: [next((v for s, _, v in r["evals"] if s == step), float("nan")) for r in rs] for step in steps}
        results[name] = {"keys": variants[name], "held_out": finals, "median_held_out": statistics.median(finals),
                         "median_held_out_at": {step: statistics.median(vs) for step, vs in at.items()},
                         "run_s": [round(r["run_s"], 1) for r in rs],
                         "run_s_ratio": statistics.median(r["run_s"] for r in rs) / base_s,
                         "median_step_s": statistics.median(t for r in rs for t in r["step_s"][1:] or r["step_s"])}
    return {"settings": {"config": config, "seeds": list(seeds)}, "results": results}
