"""`minigrpo plan`: estimate a run's peak memory by part before running it, and what would make it fit.

The model is built on the meta device (no weights loaded) for exact parameter counts and layer shapes.
Per part, in bytes:

    weights         parameters x dtype size (4-bit: Linear weights of the layers at ~0.53 B, the rest kept)
    trainable       LoRA adapters (fp32, as peft keeps them) or every weight under full fine-tuning
    gradients       one per trainable parameter, alive from backward to the optimizer step
    optimizer       AdamW: 2 states per trainable parameter (8-bit AdamW: 1 byte each)
    reference       beta > 0 under full fine-tuning: a frozen copy of the weights (LoRA: none)
    generation      KV cache of a rollout (all completions of a step, prompt + max_completion_length each)
                    x 1.2 (row compaction copies one layer at a time; measured), the sampling logits, and
                    under LoRA the temporary merged copy of the adapted weights (`rollout_merge_lora`);
                    with a `rollout_dtype` other than dtype, a copy of the weights and the KV cache in it;
                    the engine's own decode step (Llama family) keeps each prompt's KV once for its samples
                    and, on a CPU in float32, a packed copy of the linear weights (`engine_decode`)
    evaluation      the same for an evaluation batch (greedy, one completion per prompt)
    activations     saved for backward over one micro-batch at the longest completions: (9h + 2kv + 4m)
                    values per token per layer counted from a Llama layer's saved tensors, x 1.6 measured
                    (attention kernels' own buffers; SmolLM2-135M, LoRA on all linear layers); only the
                    layer inputs (+ one layer) under gradient checkpointing
    logits chunk    the LM head's chunk of completion tokens x vocab, fp32: ~7.5 live copies (logits,
                    log-softmax, probabilities and their gradients; measured)
    runtime (CPU)   the Python process with torch, transformers and peft imported (measured here), plus
                    0.25 GiB measured for the tokenizer, data and first forward passes of a run

Every figure is in GiB (2**30 bytes), as memory/peak_gb.
Peak = runtime + weights + trainable + optimizer + reference + max(generation, evaluation,
gradients + activations + logits chunk). Completions are taken at max_completion_length (the worst case).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minigrpo import tiny
from minigrpo.compat import decoder_parts
from minigrpo.config import Config
from minigrpo.model import RANDOM_INITS, load_tokenizer, model_errors, resolve_model_path
from minigrpo.monitor import peak_rss_bytes
from minigrpo.rollout.decode import kv_layout
from minigrpo.tasks.prompts import render_prompts, resolve_template
from minigrpo.tasks.sources import load_split

GB = 1024**3  # GiB: the unit of every memory figure (monitor.peak_memory_gb, memory/peak_gb)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.53  # 4 bits + double-quantized absmax per 64 weights
KV_FACTOR = 1.2  # generation peak / raw KV cache, measured on the tiny model (125-1000 rows)
LOGITS_COPIES = 7.5  # [chunk, vocab] fp32 tensors alive at the LM head's peak, measured on SmolLM2-135M
ACT_FACTOR = 1.6  # measured saved activations / the analytic count (SmolLM2-135M, packed and shared-prefix)
RUN_OVERHEAD = 0.25 * 1024**3  # a CPU run's tokenizer, data and first-forward buffers, measured


@dataclass
class Plan:
    """Estimated bytes per part, the peak, and (for a memory limit) whether it fits and what would help."""
    parts: dict[str, float]
    peak: float
    phase: str  # which phase sets the peak
    limit: float | None = None
    suggestions: list[tuple[str, float]] = field(default_factory=list)  # (override, peak with it)

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.peak <= self.limit


@dataclass
class Shape:
    """What the estimate needs to know about the model."""
    params: int  # all parameters (tied ones once)
    linear_layer_params: int  # weights of Linear layers inside the decoder layers (what 4-bit quantizes)
    lora_params: int  # adapter parameters for cfg's rank and targets
    adapted_params: int  # weights of the Linear layers that get adapters
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads x head_dim
    vocab: int
    lm_head_params: int = 0  # the LM head's weight (tied or not)
    q_dim: int = 0  # num_attention_heads x head_dim (gemma-3: wider than hidden); 0: hidden
    norms: int = 2  # hidden-sized norms per decoder layer (Llama: 2; gemma-3: 4, around attention and MLP)
    native: bool = False  # the engine decodes it with its own step (compat.decoder_parts): KV shared per prompt


def model_shape(cfg: Config) -> Shape:
    """Parameter counts and dimensions of cfg.model, from its config, with the model built on the meta device."""
    if cfg.model in RANDOM_INITS:
        tok = getattr(tiny, RANDOM_INITS[cfg.model][0])()
        with torch.device("meta"):
            model = getattr(tiny, RANDOM_INITS[cfg.model][1])(tok, seed=0)
        mcfg = model.config
    else:
        with model_errors(cfg.model):
            mcfg = AutoConfig.from_pretrained(resolve_model_path(cfg.model), gguf_file=cfg.gguf_file)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mcfg)
    targets = cfg.lora_target_modules
    linear_params = lora = adapted = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        linear_params += module.weight.numel()
        if targets == ["all-linear"] or name.rsplit(".", 1)[-1] in targets:
            lora += cfg.lora_r * (module.in_features + module.out_features)
            adapted += module.weight.numel()
    h = mcfg.hidden_size
    heads = mcfg.num_attention_heads
    head_dim = getattr(mcfg, "head_dim", None) or h // heads
    kv = (getattr(mcfg, "num_key_value_heads", None) or heads) * head_dim
    head = model.get_output_embeddings()
    # hidden-sized norms (a 1-D weight of `hidden` entries), the final one aside, per layer
    norm_count = sum(1 for m in model.modules() if "norm" in type(m).__name__.lower()
                     and getattr(getattr(m, "weight", None), "shape", None) == (h,))
    return Shape(q_dim=heads * head_dim, norms=max(round((norm_count - 1) / mcfg.num_hidden_layers), 1),
                 params=sum(p.numel() for p in model.parameters()), linear_layer_params=linear_params,
                 lora_params=lora, adapted_params=adapted, layers=mcfg.num_hidden_layers, hidden=h,
                 intermediate=getattr(mcfg, "intermediate_size", 4 * h), kv_dim=kv, vocab=mcfg.vocab_size,
                 lm_head_params=head.weight.numel() if head is not None else 0,
                 native=decoder_parts(model)[0] is not None)


def prompt_tokens(cfg: Config, sample: int = 256) -> int:
    """The longest prompt, in tokens, over the first `sample` training prompts (max_prompt_length if unknown)."""
    try:
        tok = load_tokenizer(cfg)
        examples = load_split(cfg, cfg.train_split, sample)
        fewshot = examples[:cfg.num_fewshot] if resolve_template(cfg, tok, examples) == "fewshot" else None
        texts = render_prompts(cfg, tok, examples, fewshot)
        return max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    except Exception:  # no data or tokenizer at hand: the configured bound
        return cfg.max_prompt_length


def runtime_bytes() -> float:
    """This process's resident memory now: Python with torch, transformers and peft imported (CPU runs)."""
    import peft  # noqa: F401  (a training run imports it too)
    import transformers  # noqa: F401

    return peak_rss_bytes() + RUN_OVERHEAD


def estimate(cfg: Config, shape: Shape, prompt_len: int, device: str = "cpu", runtime: float = 0.0) -> Plan:
    """Bytes per part and the peak for `cfg` on `device` ('cpu' or 'cuda')."""
    act = DTYPE_BYTES[cfg.dtype]
    quantized = cfg.load_in_4bit and device == "cuda"
    weights = shape.params * act
    if quantized:
        weights -= shape.linear_layer_params * (act - NF4_BYTES)
    trainable = shape.lora_params if cfg.use_peft else shape.params
    train_bytes = 4 if cfg.use_peft else act  # peft keeps adapters in fp32
    eight_bit = cfg.optim != "adamw" and device == "cuda"
    optimizer = trainable * 2 * (1 if eight_bit else train_bytes)
    reference = weights if cfg.beta > 0 and not cfg.use_peft else 0.0
    T, P, L = cfg.max_completion_length, prompt_len, shape.layers
    kv_token = L * 2 * shape.kv_dim * act

    merged = shape.adapted_params * act if cfg.use_peft and cfg.rollout_merge_lora and not quantized else 0.0
    # rollout_dtype other than dtype (engine, hf): a copy of the weights in it while sampling, and its KV cache
    cast = DTYPE_BYTES[cfg.rollout_cast] if cfg.rollout_cast and cfg.rollout_backend != "vllm" and not quantized \
        else 0
    # the engine's own decode step (engine_decode): each prompt's KV once for its samples; on a CPU under auto, a
    # packed copy of the float32 linear weights (compat.mkl_packed_linear) while generating
    native = shape.native and cfg.rollout_backend == "engine" and cfg.engine_decode != "hf"

    def generation(rows: int, prompts: int, kv_bytes: float, weight_bytes: int, extra: float) -> float:
        packed = (shape.linear_layer_params + shape.lm_head_params) * 4 if native and weight_bytes == 4 and \
            cfg.engine_decode == "auto" and device == "cpu" and not quantized else 0
        # the native step keeps the completions' keys and values in float32 on a CPU (rollout/decode.own_dtype),
        # with each prompt's copied ahead of them when that copy is small (decode.kv_layout), beside the prefill's
        own = kv_token / act * 4 if device == "cpu" else kv_bytes
        expanded = kv_layout(rows, prompts, P, shape.kv_dim) == "expanded"
        kv = (rows * ((P if expanded else 0) + T) * own + prompts * P * kv_bytes) if native \
            else rows * (P + T) * kv_bytes
        return KV_FACTOR * kv + rows * shape.vocab * 4 * 3 + extra + packed

    rows = cfg.completions_per_step
    rollout = generation(rows, rows // cfg.num_generations, kv_token * cast / act if cast else kv_token,
                         cast or act, merged + shape.params * cast)
    evaluation = generation(*[min(cfg.eval_batch_size, cfg.eval_limit)] * 2, kv_token, act, merged) \
        if cfg.eval_limit else 0.0
    B = cfg.per_device_train_batch_size
    groups = max(1, B // cfg.num_generations)
    tokens = B * T + groups * P
    # saved per token and layer, Llama's layout (two norms, queries as wide as hidden), plus what a layer keeps
    # beyond it: each further norm's input and output, queries (and their attention output) wider than hidden
    extra = 2 * (shape.norms - 2) * shape.hidden + 2 * (max(shape.q_dim, shape.hidden) - shape.hidden)
    per_token_layer = ACT_FACTOR * (9 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate + extra) * act
    if cfg.gradient_checkpointing:
        activations = tokens * (L * shape.hidden * act + per_token_layer)
    else:
        activations = tokens * L * per_token_layer
    chunk = min(cfg.logprob_chunk_size or B * T, B * T)
    logits = chunk * shape.vocab * 4 * LOGITS_COPIES
    parts = {"runtime": runtime, "weights": weights, "trainable": trainable * train_bytes if cfg.use_peft else 0.0,
             "optimizer": optimizer, "reference": reference, "generation": rollout, "evaluation": evaluation,
             "gradients": trainable * train_bytes, "activations": activations, "logits chunk": logits}
    static = sum(parts[k] for k in ("runtime", "weights", "trainable", "optimizer", "reference"))
    phases = {"generation": rollout, "evaluation": evaluation,
              "training": parts["gradients"] + activations + logits}
    phase = max(phases, key=phases.get)
    return Plan(parts, static + phases[phase], phase)


# Options tried, in order, when a run does not fit: (override, condition on the config and device).
REMEDIES: list[tuple[dict[str, Any], Any]] = [
    ({"gradient_checkpointing": True}, lambda c, d: not c.gradient_checkpointing),
    ({"use_peft": True}, lambda c, d: not c.use_peft),
    ({"load_in_4bit": True, "use_peft": True}, lambda c, d: d == "cuda" and not c.load_in_4bit),
    ({"optim": "paged_adamw_8bit"}, lambda c, d: d == "cuda" and c.optim == "adamw"),
    ({"logprob_chunk_size": 256}, lambda c, d: c.logprob_chunk_size == 0 or c.logprob_chunk_size > 256),
    ({"eval_batch_size": 32}, lambda c, d: c.eval_limit and c.eval_batch_size > 32),
    ({"beta": 0.0}, lambda c, d: c.beta > 0 and not c.use_peft),
]


OFFLOAD = "(launch) accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 1 -m minigrpo train"


def plan(cfg: Config, device: str = "cpu", limit_gb: float | None = None) -> Plan:
    """The estimate for cfg, and, under a memory limit, the options (alone, then combined) that make it fit."""
    cfg.validate_grpo()  # the plan is a GRPO run's
    runtime = runtime_bytes() if device == "cpu" else 0.0  # first: before this process loads anything else
    shape, prompt_len = model_shape(cfg), prompt_tokens(cfg)
    result = estimate(cfg, shape, prompt_len, device, runtime)
    result.limit = limit_gb * GB if limit_gb else None
    if result.limit is None or result.fits:
        return result
    candidates = [o for o, applies in REMEDIES if applies(cfg, device)]
    mb = cfg.per_device_train_batch_size
    while mb > cfg.num_generations and mb % 2 == 0:  # smaller micro-batches, more accumulation
        mb //= 2
        candidates.append({"per_device_train_batch_size": mb,
                           "gradient_accumulation_steps": cfg.completions_per_step // mb})
    if device == "cuda" and result.parts["optimizer"]:  # ZeRO-2 offload: the optimizer steps in CPU memory
        result.suggestions.append((OFFLOAD, result.peak - result.parts["optimizer"]))
    combined: dict[str, Any] = {}
    for overrides in candidates:
        peak = estimate(dataclasses.replace(cfg, **overrides), shape, prompt_len, device, runtime).peak
        result.suggestions.append((_flags(overrides), peak))
        combined |= overrides
        combined_peak = estimate(dataclasses.replace(cfg, **combined), shape, prompt_len, device, runtime).peak
        if combined_peak <= result.limit and len(combined) > len(overrides):
            result.suggestions.append((_flags(combined), combined_peak))
            break
    return result


def _flags(overrides: dict[str, Any]) -> str:
    return " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


def report(cfg: Config, result: Plan, device: str) -> str:
    """The plan as text: parts, peak, verdict, suggestions."""
    lines = [f"minigrpo plan: {cfg.model} on {device}, {'LoRA r=' + str(cfg.lora_r) if cfg.use_peft else 'full'}"
             f" fine-tuning, {cfg.dtype}{', 4-bit base' if cfg.load_in_4bit and device == 'cuda' else ''}, "
             f"{cfg.completions_per_step} completions/step (micro-batch {cfg.per_device_train_batch_size}) x "
             f"{cfg.max_completion_length} tokens"]
    for name, value in result.parts.items():
        if value:
            lines.append(f"  {name:<14}{value / GB:8.2f} GiB")
    lines.append(f"  {'peak':<14}{result.peak / GB:8.2f} GiB  (set by {result.phase})")
    if result.limit is not None:
        verdict = "fits" if result.fits else "does NOT fit"
        lines.append(f"{verdict} in {result.limit / GB:.1f} GiB")
        for flags, peak in result.suggestions:
            mark = "fits" if peak <= result.limit else "    "
            lines.append(f"  {mark}  {flags:<60} -> {peak / GB:.2f} GiB")
    return "\n".join(lines)
