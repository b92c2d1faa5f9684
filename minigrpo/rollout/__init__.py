"""How completions are made: `generate(backend, ...)` and the table of backends (`rollout_backend`).

A backend is a module with
    generate(model, tokenizer, prompts, params, merge_lora=True) -> Rollout   (minigrpo.rollout.types)
and optionally
    check(cfg)         refuse a config it cannot run, at start (before any folder or download)
    start(cfg, model, tokenizer)  set itself up once the policy is loaded (vLLM builds its engine there)
Adding one: a module here and its line in BACKENDS, the one list of names (the config's `rollout_backend`
accepts exactly these). The loop and the CLI name no backend. Backends load on first use: vLLM is optional,
and this file stays free of torch so the config can read the names.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from minigrpo.errors import ConfigError

if TYPE_CHECKING:
    from minigrpo.rollout.types import Rollout, SamplingParams

# name -> (module, what it is)
BACKENDS = {
    "engine": ("minigrpo.rollout.engine", "minigrpo's engine: each prompt prefilled once per group"),
    "hf": ("minigrpo.rollout.hf", "transformers' generate (the reference)"),
    "vllm": ("minigrpo.rollout.vllm", "vLLM, colocated (CUDA and the gpu extra, or vLLM's CPU build)"),
}


def backend(name: str) -> ModuleType:
    """The module of rollout backend `name`."""
    if name not in BACKENDS:
        raise ConfigError(f"rollout_backend: unknown {name!r}; available: {list(BACKENDS)}")
    return importlib.import_module(BACKENDS[name][0])


def generate(name: str, model: Any, tokenizer: Any, prompts: list[str], params: SamplingParams,
             merge_lora: bool = True) -> Rollout:
    """`params.n` completions per prompt from backend `name` (LoRA folded into the weights while it runs,
    unless merge_lora is False or the backend folds it into its own copy)."""
    return backend(name).generate(model, tokenizer, prompts, params, merge_lora=merge_lora)


def check(cfg: Any) -> None:
    """The configured backend's start-up check (a ConfigError when it cannot run here), if it has one."""
    hook = getattr(backend(cfg.rollout_backend), "check", None)
    if hook is not None:
        hook(cfg)


def start(cfg: Any, model: Any, tokenizer: Any) -> None:
    """Set up the configured backend for `model`, if it needs it (vLLM's colocated engine)."""
    hook = getattr(backend(cfg.rollout_backend), "start", None)
    if hook is not None:
        hook(cfg, model, tokenizer)
