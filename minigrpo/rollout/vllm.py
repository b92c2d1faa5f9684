"""The vLLM rollout backend (`rollout_backend: vllm`, extra `gpu`, CUDA only): a colocated vLLM instance.

vLLM runs in the training process, on the same GPU, with `gpu_memory_utilization` of its memory. Before
each generation the policy's current weights are pushed into it:

- LoRA: merged. Each adapted Linear is sent as W + s * B @ A (computed by `merged_lora`, the same fold the
  engine uses), and only those matrices: the rest of the model never changes, so it is not sent again.
  Merged rather than vLLM's own LoRA support because decoding then runs vLLM's plain (fastest) kernels,
  with no per-token LoRA path and no adapter files written and reloaded every step.
- Full fine-tuning: every parameter.

Sleep mode (`vllm_sleep: true`) hands vLLM's memory back while the trainer runs: level 1 under LoRA (the
weights go to CPU memory and come back, so the unchanged base needs no push), level 2 under full
fine-tuning (the weights are dropped: every one is pushed again anyway).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from minigrpo.compat import vllm_runner_model
from minigrpo.config import Config
from minigrpo.errors import ConfigError
from minigrpo.model import MergedLinear, merged_lora, resolve_model_path
from minigrpo.rollout.types import Rollout, SamplingParams, eos_token_ids, make_rollout

_INSTANCES: dict[int, ColocatedVLLM] = {}  # one colocated vLLM per policy model (keyed by id)


def check(cfg: Config) -> None:
    """At start: `rollout_backend: vllm` needs CUDA, vLLM and a model vLLM can load; else a ConfigError."""
    fix = "or set rollout_backend: engine (minigrpo's own engine, which runs everywhere)"
    if not torch.cuda.is_available():
        raise ConfigError(f"rollout_backend: vllm needs a CUDA GPU and this machine has none (torch "
                          f"{torch.__version__}, torch.cuda.is_available() is False); {fix}")
    try:
        import vllm  # noqa: F401  (optional dependency: the gpu extra)
    except ImportError:
        raise ConfigError(f"rollout_backend: vllm needs the vllm package: pip install -e '.[gpu]'; {fix}") from None
    if cfg.model in ("tiny-random", "tiny-arith-init"):
        raise ConfigError(f"rollout_backend: vllm loads the model from disk or the hub; {cfg.model!r} is built in "
                          f"code. Save it first or {fix}")
    if cfg.gguf_file:
        raise ConfigError(f"rollout_backend: vllm takes a transformers checkpoint (dir or hub id), not a GGUF file "
                          f"({cfg.gguf_file}); {fix}")
    if cfg.device not in ("auto", "cuda") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"rollout_backend: vllm is colocated on the training GPU; device is {cfg.device!r}. "
                          f"Set device: cuda, {fix}")


def vllm_weights(model: torch.nn.Module, only_adapted: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs under the base model's names, as vLLM's load_weights expects.

    Call inside `merged_lora(model)` for a peft model: the adapted layers are then plain Linear modules
    holding the merged weights. `only_adapted` keeps just those (the base never changes under LoRA).
    """
    adapted = {n for n, m in model.named_modules() if isinstance(m, MergedLinear)}
    out = []
    for name, param in model.named_parameters():
        if only_adapted and name.rpartition(".")[0] not in adapted:
            continue
        out.append((name.removeprefix("base_model.model."), param.detach()))
    return out


def rollout_from_outputs(tokenizer: Any, prompts: list[str], n: int, prompt_token_ids: list[list[int]],
                         outputs: list[Any], eos: list[int], pad_id: int, device: torch.device,
                         stop: tuple[str, ...] | list[str] = ()) -> Rollout:
    """A Rollout (left-padded prompts, right-padded completions, masks) from vLLM's RequestOutputs."""
    P = max(len(p) for p in prompt_token_ids)
    prompt_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, ids in enumerate(prompt_token_ids):
        prompt_ids[i, P - len(ids):], prompt_mask[i, P - len(ids):] = torch.tensor(ids), 1
    completions = []
    for out in outputs:
        assert len(out.outputs) == n, f"vLLM returned {len(out.outputs)} completions for a prompt, expected {n}"
        for c in out.outputs:
            ids = list(c.token_ids)
            # stop_reason: None for EOS, the string for a stop string (its last token is in token_ids already)
            on_eos = c.finish_reason == "stop" and not isinstance(getattr(c, "stop_reason", None), str)
            if on_eos and (not ids or ids[-1] not in eos):
                ids.append(eos[0])  # stopped on EOS without returning it: the mask must include the EOS
            completions.append(ids)
    C = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), C), pad_id, dtype=torch.long)
    for i, ids in enumerate(completions):
        completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return make_rollout(tokenizer, prompts, n, prompt_ids.repeat_interleave(n, 0).to(device),
                        prompt_mask.repeat_interleave(n, 0).to(device), completion_ids.to(device), eos, stop)


class ColocatedVLLM:
    """A colocated vLLM for one policy model; `generate` pushes the current weights first."""

    def __init__(self, cfg: Config, model: torch.nn.Module) -> None:
        from vllm import LLM  # optional dependency (the gpu extra), as below

        # In-process (colocated) vLLM: its workers are this process, as TRL's colocate mode does. Under
        # torchrun / accelerate launch every process has its own vLLM on its own GPU (tensor parallel 1,
        # vLLM's external launcher reads the launch's RANK / WORLD_SIZE) and its own sampling seed.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost"),
                           ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
            os.environ.setdefault(key, value)
        self.use_peft, self.sleep = cfg.use_peft, cfg.vllm_sleep
        self.llm = LLM(model=resolve_model_path(cfg.model), dtype=cfg.dtype, seed=cfg.seed + int(os.environ["RANK"]),
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                       enable_sleep_mode=cfg.vllm_sleep, distributed_executor_backend="external_launcher")
        self.asleep = False
        if self.sleep:
            self._sleep()

    def _sleep(self) -> None:
        self.llm.sleep(level=1 if self.use_peft else 2)
        self.asleep = True

    def push_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into vLLM (merged LoRA layers only, or all of them)."""
        runner_model = vllm_runner_model(self.llm)
        with merged_lora(model):
            runner_model.load_weights(vllm_weights(model, only_adapted=self.use_peft))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                 params: SamplingParams) -> Rollout:
        from vllm import SamplingParams as VLLMSampling  # optional dependency (the gpu extra)

        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False
        self.push_weights(model)
        eos = eos_token_ids(model, tokenizer)
        greedy = params.temperature == 0
        sampling = VLLMSampling(n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                top_p=1.0 if greedy else params.top_p,
                                top_k=params.top_k if params.top_k > 0 and not greedy else -1,
                                stop_token_ids=eos, stop=list(params.stop) or None,
                                include_stop_str_in_output=True)  # the rollout convention: rollout/types.py
        prompt_token_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], sampling,
                                    use_tqdm=False)
        if self.sleep:
            self._sleep()
        device = next(model.parameters()).device
        return rollout_from_outputs(tokenizer, prompts, params.n, prompt_token_ids, outputs, eos,
                                    tokenizer.pad_token_id, device, params.stop)


def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], params: SamplingParams,
             merge_lora: bool = True) -> Rollout:
    """The `vllm` rollout backend: the model's colocated vLLM, made at setup by `start` (it always folds LoRA
    into its own copy of the weights: `merge_lora` changes nothing)."""
    if id(model) not in _INSTANCES:
        raise RuntimeError("rollout_backend: vllm: no vLLM instance for this model; call start(cfg, model) first")
    return _INSTANCES[id(model)].generate(model, tokenizer, prompts, params)


def start(cfg: Config, model: torch.nn.Module) -> None:
    """Create the colocated vLLM for `model`."""
    check(cfg)
    if id(model) not in _INSTANCES:
        _INSTANCES[id(model)] = ColocatedVLLM(cfg, model)
