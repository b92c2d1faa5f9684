"""The GRPO loop, top to bottom: prompts -> rollout -> rewards -> advantages -> loss and update -> logging.

One step = one generated batch of `prompts_per_step x num_generations` completions, followed by
`num_iterations` optimizer updates on it (each over `gradient_accumulation_steps` micro-batches).

How this deviates from the DeepSeekMath paper (all configurable, TRL's current defaults):
- the loss is aggregated per token over the whole batch (`loss_type: dapo`), not per sequence;
- beta = 0 by default: no KL term and no reference model;
- under LoRA the reference policy is the base model with adapters disabled (no second copy in memory).
Note: with num_iterations = 1 the ratio is exactly 1 and the advantages are centred, so the logged loss
is ~0 while the gradient is not; watch train/reward and eval/accuracy instead.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

from minigrpo.algo import LOSS_TYPES, Norm, group_advantages, masked_mean, policy_loss
from minigrpo.checkpoint import (
    ENGINE_DIR,
    checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_policy,
    set_rng_state,
    start_checkpoint,
)
from minigrpo.config import Config, ConfigError, save_config
from minigrpo.data import DataError, Example, build_prompt, load_split
from minigrpo.dist import Ranks
from minigrpo.evaluate import evaluate
from minigrpo.logprobs import policy_logprobs
from minigrpo.model import Reference, load_model, make_optimizer_class, trainable_parameters
from minigrpo.monitor import Monitor, make_run_dir, print0
from minigrpo.plot import plot_run
from minigrpo.rewards import is_correct, load_reward, score
from minigrpo.rollout import Rollout, SamplingParams, generate, merge_rollouts, select_rows


class Interrupt:
    """While alive: the first SIGINT only sets `requested` (the loop saves and stops after the step); the
    second raises KeyboardInterrupt at once. `restore()` puts the previous handler back."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print0("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)")

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. too many non-finite updates in a row); the message says why and what to do."""


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PromptSampler:
    """Endless shuffled passes over the dataset indices, reproducible from the seed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.gen, self.order, self.pos = size, torch.Generator().manual_seed(seed), [], 0
        self.drawn = 0  # indices handed out so far

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "order": list(self.order), "pos": self.pos, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        self.order, self.pos, self.drawn = list(state["order"]), state["pos"], state["drawn"]

    def take(self, n: int) -> list[int]:
        """The next n indices (a new permutation starts when a pass is used up)."""
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.size, generator=self.gen).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
            self.drawn += 1
        return out


def render_prompts(cfg: Config, tokenizer: Any, examples: list[Example], fewshot: list[Example] | None,
                   where: str) -> list[str]:
    """Prompt text for each example; a prompt over max_prompt_length tokens is an error naming the row."""
    prompts = [build_prompt(tokenizer, ex.question, cfg.template, cfg.system_prompt, fewshot) for ex in examples]
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    for i, n in enumerate(lengths):
        if n > cfg.max_prompt_length:
            raise DataError(f"{where} row {i + 1}: the prompt has {n} tokens > max_prompt_length="
                             f"{cfg.max_prompt_length}; raise max_prompt_length or remove the row")
    return prompts


@dataclass
class Scored:
    """A rollout and its rewards: what the prompt, rollout and reward phases hand to the update."""
    rollout: Rollout
    columns: dict[str, list[Any]]  # dataset columns, one value per completion (the rewards' keyword args)
    totals: list[float | None]  # weighted reward per completion; None = skipped
    per_func: dict[str, list[float | None]]  # each reward function's values
    generate_s: float
    score_s: float
    reward_errors: int = 0  # samples a reward function raised on (scored None)


def rollout_and_score(cfg: Config, model: torch.nn.Module, tokenizer: Any, examples: list[Example],
                      prompts: list[str], reward_funcs: list[tuple[str, Callable, float]],
                      sampling: SamplingParams) -> Scored:
    """Sample G completions per prompt, then score each with every reward function."""
    t0 = time.perf_counter()
    ro = generate(cfg.rollout_backend, model, tokenizer, prompts, sampling, cfg.rollout_merge_lora)
    t1 = time.perf_counter()
    columns = {key: [ex.columns[key] for ex in examples for _ in range(sampling.n)] for key in examples[0].columns}
    lengths = ro.completion_mask.sum(1).long().tolist()
    ids = [row[:n] for row, n in zip(ro.completion_ids.tolist(), lengths)]  # TRL passes completion_ids too
    errors: dict[str, int] = {}
    totals, per_func = score(reward_funcs, ro.prompts, ro.completions, columns | {"completion_ids": ids}, errors)
    return Scored(ro, columns, totals, per_func, t1 - t0, time.perf_counter() - t1, sum(errors.values()))


def flat_groups(totals: list[float | None], G: int) -> list[bool]:
    """Per group: True when its scored rewards are all equal (or fewer than 2): no learning signal."""
    groups = [[r for r in totals[i:i + G] if r is not None] for i in range(0, len(totals), G)]
    return [len(g) < 2 or max(g) == min(g) for g in groups]


def _concat(dicts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    return {k: [v for d in dicts for v in d[k]] for k in dicts[0]}


def keep_informative(parts: list[Scored], num_groups: int, G: int, pad_id: int) -> Scored:
    """Merge several scored rollouts and keep num_groups groups, informative ones first (DAPO)."""
    ro = merge_rollouts([p.rollout for p in parts], pad_id)
    totals = [r for p in parts for r in p.totals]
    flat = flat_groups(totals, G)
    keep = sorted(([g for g, f in enumerate(flat) if not f] + [g for g, f in enumerate(flat) if f])[:num_groups])
    rows = [g * G + j for g in keep for j in range(G)]
    columns, per_func = _concat([p.columns for p in parts]), _concat([p.per_func for p in parts])
    return Scored(select_rows(ro, rows), {k: [v[i] for i in rows] for k, v in columns.items()},
                  [totals[i] for i in rows], {k: [v[i] for i in rows] for k, v in per_func.items()},
                  sum(p.generate_s for p in parts), sum(p.score_s for p in parts), sum(p.reward_errors for p in parts))


def trim_logs(run_dir: Path, step: int) -> None:
    """Drop metrics and samples logged after `step` (the steps a resumed run will do again)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.is_file():
            keep = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(keep))


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def update_policy(model: torch.nn.Module, ref: Reference | None, ro: Rollout, advantages: torch.Tensor,
                  loss_mask: torch.Tensor, cfg: Config, optimizer: torch.optim.Optimizer,
                  scheduler: Any, ranks: Ranks | None = None, wrapped: torch.nn.Module | None = None,
                  ) -> dict[str, float]:
    """num_iterations clipped-surrogate updates on one rollout; returns the step's loss statistics.

    With several processes, `wrapped` is the engine's model (DDP, DeepSpeed or FSDP: each averages gradients
    over processes): the normalising counts are the global ones and each loss is scaled by the world size,
    so the gradient is the one-process gradient of the whole global batch."""
    ranks, wrapped = ranks or Ranks(), wrapped or model
    input_ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)  # [B, P+C]
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)  # [B, P+C]
    C, mb = ro.completion_ids.shape[1], cfg.per_device_train_batch_size
    micro = [slice(i, i + mb) for i in range(0, input_ids.shape[0], mb)]
    # Micro-batches of whole groups run each prompt once (shared prefix); otherwise every row in full.
    group_size = cfg.num_generations if mb % cfg.num_generations == 0 else 1
    sequences, tokens, micro_batches = ranks.sum([input_ids.shape[0], float(loss_mask.sum()), len(micro)])
    norm = Norm(num_sequences=int(sequences), num_tokens=int(tokens), num_micro_batches=int(micro_batches),
                max_completion_length=cfg.max_completion_length)
    ref_logp: list[torch.Tensor | None] = [None] * len(micro)
    if ref is not None:  # reference log-probs once per rollout, no graph
        with torch.no_grad(), ref.active() as ref_model:
            ref_logp = [policy_logprobs(ref_model, input_ids[s], attention[s], C, cfg.temperature, group_size,
                                        cfg.logprob_chunk_size)[0]
                        for s in micro]
    old_logp: list[torch.Tensor | None] = [None] * len(micro)
    sums = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "ratio": 0.0}
    params, grad_norms, skipped = trainable_parameters(model), [], 0
    model.train()
    for _ in range(cfg.num_iterations):
        for j, s in enumerate(micro):
            logp, entropy = policy_logprobs(wrapped, input_ids[s], attention[s], C, cfg.temperature, group_size,
                                            cfg.logprob_chunk_size)
            if old_logp[j] is None:  # no update has happened yet: the current policy IS the sampler
                old_logp[j] = logp.detach()
            out = policy_loss(logp, old_logp[j], advantages[s], loss_mask[s], cfg.epsilon, cfg.epsilon_hi,
                              cfg.beta, ref_logp[j], cfg.importance_sampling_level, cfg.dual_clip)
            loss = LOSS_TYPES[cfg.loss_type](out.per_token, loss_mask[s], norm)
            # the engine averages over processes; the norm already counts them all
            ranks.backward(loss * ranks.world, last=j == len(micro) - 1)
            # token-weighted over the global batch: the mean over processes of these is the global token mean
            share = loss_mask[s].sum().item() * ranks.world / max(tokens, 1) / cfg.num_iterations
            sums["loss"] += loss.item() * ranks.world / cfg.num_iterations  # averaged over processes: the total
            for key, value in (("kl", out.kl), ("clip_ratio", out.clipped), ("entropy", entropy.detach()),
                               ("ratio", out.ratio)):
                if value is not None:
                    sums[key] += masked_mean(value, loss_mask[s]).item() * share
        grad_norm, applied = ranks.step(optimizer, params, cfg.max_grad_norm)  # clip; a non-finite
        grad_norms.append(grad_norm)  # gradient would poison the weights: that update is skipped
        skipped += not applied
        with warnings.catch_warnings():  # the schedule counts skipped updates too (torch would warn once)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
    return {f"train/{k}": v for k, v in sums.items()} | {
        "train/grad_norm": sum(grad_norms) / len(grad_norms), "train/skipped_updates": float(skipped)}


def run_eval(cfg: Config, model: torch.nn.Module, tokenizer: Any, prompts: list[str],
             examples: list[Example], ranks: Ranks | None = None) -> dict[str, float]:
    """Greedy held-out accuracy (the task metric, independent of the reward weights), split over processes."""
    if not prompts:
        return {}
    ranks = ranks or Ranks()
    prompts, golds = ranks.share(prompts), ranks.share([ex.columns["answer"] for ex in examples])
    keys = ["accuracy", "format", "mean_length"]
    totals = [0.0] * (len(keys) + 1)
    with ranks.full_weights(model):  # every process enters (ZeRO-3 gathers), even one without prompts
        if prompts:
            report = evaluate(model, tokenizer, prompts, golds, max_new_tokens=cfg.max_completion_length,
                              batch_size=cfg.eval_batch_size, backend=cfg.rollout_backend)
            totals = [report[k] * len(prompts) for k in keys] + [len(prompts)]
    totals = ranks.sum(totals)
    return {f"eval/{k}": v / totals[-1] for k, v in zip(keys, totals)}


@dataclass
class RunSetup:
    """What every stage (GRPO, SFT) starts from: the run folder, the policy, the data and its prompts."""
    run_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    train_set: list[Example]
    eval_set: list[Example]
    train_prompts: list[str]
    eval_prompts: list[str]
    ranks: Ranks = dataclasses.field(default_factory=Ranks)


def setup_run(cfg: Config) -> RunSetup:
    """Run folder with the resolved config, seeds and threads, the model, both splits rendered as prompts."""
    if cfg.rollout_backend == "vllm":  # fail at start, before any folder or download, when vLLM cannot run
        from minigrpo.vllm_rollout import check_vllm
        check_vllm(cfg)
    ranks = Ranks(cfg.device)
    run_dir = ranks.broadcast(make_run_dir(cfg.output_dir) if ranks.main else None)
    if ranks.main:
        save_config(cfg, str(run_dir / "config.yaml"))
    if ranks.world > 1:
        cfg = dataclasses.replace(cfg, device=str(ranks.device))  # this process's device
    set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tok = load_model(cfg)
    if cfg.rollout_backend == "vllm":
        from minigrpo.vllm_rollout import start_engine
        start_engine(cfg, model)
    train_set = load_split(cfg, cfg.train_split)
    eval_set = load_split(cfg, cfg.eval_split, cfg.eval_limit, cfg.eval_dataset) if cfg.eval_limit else []
    fewshot = train_set[:cfg.num_fewshot] if cfg.template == "fewshot" else None
    eval_name = f"{cfg.eval_dataset or cfg.dataset} [{cfg.eval_split}]"
    return RunSetup(run_dir, model, tok, train_set, eval_set,
                    render_prompts(cfg, tok, train_set, fewshot, f"{cfg.dataset} [{cfg.train_split}]"),
                    render_prompts(cfg, tok, eval_set, fewshot, eval_name), ranks)


def make_optimizer(cfg: Config, model: torch.nn.Module, num_updates: int, cpu_offload: bool = False,
                   ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its learning-rate schedule.

    cpu_offload (DeepSpeed keeps the optimizer on the CPU): DeepSpeed's vectorised CPU AdamW."""
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam as optimizer_class  # adamw_mode by default
    else:
        optimizer_class = make_optimizer_class(cfg, next(model.parameters()).device)
    optimizer = optimizer_class(trainable_parameters(model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2))
    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=num_updates)


def finish_run(cfg: Config, run: RunSetup, monitor: Monitor, before: dict[str, float]) -> Path:
    """Final evaluation, the trained policy, summary.json and curves.png; returns the run folder."""
    after = run_eval(cfg, run.model, run.tokenizer, run.eval_prompts, run.eval_set, run.ranks)
    if after:
        monitor.log(cfg.max_steps, after)
        print0(f"held-out accuracy: before {before['eval/accuracy']:.3f} -> after {after['eval/accuracy']:.3f}")
    monitor.close()
    weights = run.ranks.policy_state()  # ZeRO-3 / FSDP: gathered from every process; else None
    if run.ranks.main:
        save_policy(run.model, run.tokenizer, run.run_dir / ("adapter" if cfg.use_peft else "model"), weights)
        (run.run_dir / "summary.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
        print0(f"curves: {plot_run(run.run_dir)}\nrun folder: {run.run_dir}")
    run.ranks.barrier()
    return run.run_dir


def train(cfg: Config, show_progress: bool = True) -> Path:
    """Run GRPO as configured; returns the run folder (config, metrics, TensorBoard, samples, adapter)."""
    return run_grpo(cfg, show_progress).run_dir


def run_grpo(cfg: Config, show_progress: bool = True) -> RunSetup:
    """Run GRPO as configured; returns the run (folder, and the trained model and tokenizer in memory)."""
    # ---- setup ----------------------------------------------------------------------------------------
    weights = cfg.reward_weights or [1.0] * len(cfg.reward_funcs)
    options = {"max_completion_length": cfg.max_completion_length, "overlong_buffer": cfg.overlong_buffer}
    reward_funcs = [(name, load_reward(name, options), w) for name, w in zip(cfg.reward_funcs, weights)]
    run = setup_run(cfg)
    model, tok, train_set, train_prompts = run.model, run.tokenizer, run.train_set, run.train_prompts
    ranks = run.ranks
    device = next(model.parameters()).device
    ref = Reference(model, cfg.use_peft) if cfg.beta > 0 else None  # before the engine may split the weights
    optimizer, scheduler = make_optimizer(cfg, model, cfg.max_steps * cfg.num_iterations, ranks.offloads_optimizer)
    # The engine (DDP, DeepSpeed, FSDP with several processes) takes the model and optimizer; the loss pass
    # goes through `wrapped`. One plain process: wrapped is the model.
    wrapped, optimizer = ranks.prepare(model, optimizer, cfg.per_device_train_batch_size, cfg.max_grad_norm)
    sampler = PromptSampler(len(train_set), cfg.seed)
    sampling = SamplingParams(n=cfg.num_generations, max_new_tokens=cfg.max_completion_length,
                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    G = cfg.num_generations
    start, bad_streak, before = 1, 0, {}  # bad_streak: steps in a row whose every update was skipped
    found = checkpoints(run.run_dir) if cfg.resume else []
    if cfg.resume and not found:  # killed before its first checkpoint: nothing to keep
        print0(f"resume: no complete checkpoint in {run.run_dir} yet: starting at step 1")
        if ranks.main:
            trim_logs(run.run_dir, -1)
    if found:  # the last complete checkpoint: weights, optimizer, schedule, data position, RNG
        done, path = found[-1]
        state = load_checkpoint(path, None if ranks.engine_state else model)
        launch = state.get("launch", {"engine": None, "world": 1})
        if ranks.engine_state and launch != {"engine": ranks.engine, "world": ranks.world}:
            raise ConfigError(f"{path} holds {launch['engine'] or 'one-process'} shards of {launch['world']} "
                              f"process(es); this launch is {ranks.engine} with {ranks.world}: resume it the "
                              f"way it was launched (same accelerate config and process count)")
        if ranks.engine_state:  # DeepSpeed / FSDP: each process loads its shards of weights and optimizer
            ranks.load_engine(path / ENGINE_DIR)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start, bad_streak, before = done + 1, state["bad_streak"], state["before"]
        if ranks.main:
            trim_logs(run.run_dir, done)
        set_rng_state(state["rng"])  # last: nothing may draw between here and the next step
        print0(f"resumed from {path}: continuing at step {start}")
    monitor = Monitor(run.run_dir, cfg.max_steps, cfg.logging_steps, show=show_progress, enabled=ranks.main)

    def checkpoint(step: int) -> Path:
        state = {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "bad_streak": bad_streak,
                 "before": before, "launch": {"engine": ranks.engine, "world": ranks.world}}
        state |= {} if ranks.engine_state else {"optimizer": optimizer.state_dict()}
        weights = ranks.policy_state()  # ZeRO-3 / FSDP: gathered from every process; else None
        tmp = ranks.broadcast(start_checkpoint(run.run_dir, step) if ranks.main else None)
        ranks.save_engine(tmp / ENGINE_DIR)  # DeepSpeed / FSDP: every process writes its shards
        ranks.barrier()
        if ranks.main:  # the rest is the same on every process (RNG: process 0's)
            save_checkpoint(run.run_dir, step, model, tok, state, cfg.save_total_limit, weights)
        ranks.barrier()
        return run.run_dir / f"checkpoint-{step}"

    def sample(n: int) -> Scored:  # phases 1-3 for this process's n of the next prompts of the data order
        # Every process draws the prompts of all (the same draw) and keeps its share. Each prompt samples
        # from its own seed (the run's seed and its place in the data stream): its completions do not
        # depend on what else is in the batch, or on which process draws them.
        seeds = [cfg.seed * 1_000_003 + sampler.drawn + i for i in range(n * ranks.world)]
        idx = sampler.take(n * ranks.world)
        mine = slice(ranks.rank * n, (ranks.rank + 1) * n)
        idx, seeds = idx[mine], seeds[mine]
        with ranks.full_weights(model):  # ZeRO-3 / FSDP: whole weights while generating
            return rollout_and_score(cfg, model, tok, [train_set[i] for i in idx],
                                     [train_prompts[i] for i in idx], reward_funcs,
                                     dataclasses.replace(sampling, seeds=seeds))

    if not found:
        before = run_eval(cfg, model, tok, run.eval_prompts, run.eval_set, ranks)
        if before:
            monitor.log(0, before)
            print0(f"held-out accuracy before training: {before['eval/accuracy']:.3f} (n={len(run.eval_set)}, "
                   f"greedy)")

    interrupt = Interrupt()  # Ctrl-C: finish the step, save a checkpoint, stop; a second Ctrl-C stops at once
    for step in range(start, cfg.max_steps + 1):
        t0 = time.perf_counter()
        # ---- 1-3. prompts -> rollout (G completions each) -> rewards --------------------------------------------
        parts = [sample(cfg.prompts_per_step)]
        # DAPO dynamic sampling: groups whose rewards are all equal carry no signal; draw fresh prompts for them.
        while cfg.dynamic_sampling and len(parts) < cfg.max_sampling_tries:
            missing = cfg.prompts_per_step - sum(not f for p in parts for f in flat_groups(p.totals, G))
            missing = int(ranks.max(missing))  # every process draws as many: the prompt stream stays shared
            if missing <= 0:
                break
            parts.append(sample(missing))
        scored = keep_informative(parts, cfg.prompts_per_step, G, tok.pad_token_id) if len(parts) > 1 else parts[0]
        ro, totals, columns = scored.rollout, scored.totals, scored.columns
        informative = sum(not f for f in flat_groups(totals, G))
        if cfg.dynamic_sampling and informative < cfg.prompts_per_step:
            print0(f"step {step}: dynamic sampling hit max_sampling_tries={cfg.max_sampling_tries} with "
                   f"{informative}/{cfg.prompts_per_step} informative groups; the rest have no signal")
        correct = [is_correct(c, a) for c, a in zip(ro.completions, columns["answer"])]
        # ---- 4. advantages ----------------------------------------------------------------------------------
        valid = torch.tensor([r is not None for r in totals], dtype=torch.float32)
        rewards = torch.tensor([r if r is not None else 0.0 for r in totals], dtype=torch.float32)
        # Over the global batch (every process's rewards, in process order), then this process's rows:
        # per group it is the same thing, and scale_rewards: batch takes the std of the whole batch.
        advantages, zero_std = group_advantages(ranks.gather(rewards), ranks.gather(valid), G, cfg.scale_rewards,
                                                cfg.std_floor)
        mine = slice(ranks.rank * len(rewards), (ranks.rank + 1) * len(rewards))
        advantages, zero_std = advantages[mine], zero_std[mine.start // G:mine.stop // G]
        keep = valid * (~zero_std).float().repeat_interleave(G) if cfg.drop_zero_std_groups else valid
        loss_mask = ro.completion_mask * keep.to(device)[:, None]  # skipped samples leave the loss
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * (~ro.truncated).float()[:, None]
        t_score = time.perf_counter()
        # ---- 5. loss and update (reference and old log-probs inside) ----------------------------------------
        stats = update_policy(model, ref, ro, advantages.to(device), loss_mask, cfg, optimizer, scheduler, ranks,
                              wrapped)
        t_end = time.perf_counter()
        # ---- 6. logging -----------------------------------------------------------------------------------
        lengths = ro.completion_mask.sum(1)
        metrics = stats | {
            "train/reward": masked_mean(rewards, valid).item(),
            "train/reward_std": rewards[valid.bool()].std().item() if valid.sum() > 1 else 0.0,
            "train/accuracy": sum(correct) / len(correct),
            "train/frac_reward_zero_std": zero_std.float().mean().item(),
            "train/skipped_samples": float(len(totals) - int(valid.sum())),
            "train/reward_errors": float(scored.reward_errors),
            "train/learning_rate": scheduler.get_last_lr()[0],
            "completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
            "completions/truncated_ratio": ro.truncated.float().mean().item(),
            "train/sampling_tries": float(len(parts)), "train/informative_groups": float(informative),
            "perf/generate_s": scored.generate_s, "perf/score_s": scored.score_s, "perf/train_s": t_end - t_score,
            "perf/step_s": t_end - t0, "perf/tokens_per_s": ro.num_completion_tokens / (t_end - t0),
            "memory/peak_gb": peak_memory_gb(device),
        }
        for name, values in scored.per_func.items():
            vals = [v for v in values if v is not None]
            metrics[f"train/rewards/{name}"] = sum(vals) / len(vals) if vals else float("nan")
        if step % cfg.logging_steps == 0:
            monitor.samples(step, [{"prompt": ro.prompts[i], "completion": ro.completions[i], "reward": totals[i],
                                    "answer": columns["answer"][i]} for i in range(min(cfg.log_completions, G))])
        # ---- 7. evaluation and checkpoint -------------------------------------------------------------------
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            metrics |= run_eval(cfg, model, tok, run.eval_prompts, run.eval_set, ranks)
        metrics = ranks.mean_metrics(metrics)
        monitor.log(step, metrics)
        bad_streak = bad_streak + 1 if stats["train/skipped_updates"] == cfg.num_iterations else 0
        too_bad = cfg.max_bad_steps and bad_streak >= cfg.max_bad_steps
        if (cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.max_steps)) or interrupt.requested \
                or too_bad:
            path = checkpoint(step)
        if too_bad:  # skipped updates left the weights as the last good update made them
            monitor.close()
            interrupt.restore()
            raise TrainingStopped(f"step {step}: {bad_streak} steps in a row had a non-finite loss or gradient "
                                  f"(every update skipped). The policy as of the last good update is in {path}. "
                                  f"Lower learning_rate, look for huge or NaN rewards, or set max_bad_steps: 0 to "
                                  f"go on regardless.")
        if interrupt.requested:
            monitor.close()
            interrupt.restore()
            raise TrainingStopped(f"interrupted: checkpoint of step {step} saved in {path}; continue with "
                                  f"`minigrpo train --resume {run.run_dir}`")
    interrupt.restore()

    # ---- end: final evaluation, the trained policy, curves ---------------------------------------------------
    finish_run(cfg, run, monitor, before)
    return run
