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

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigrpo import rollout
from minigrpo.agent.turns import multi_turn
from minigrpo.algo import (
    LOSS_TYPES,
    EntropyControl,
    Norm,
    decoupled_rewards,
    entropy_bonus,
    group_advantages,
    high_entropy_mask,
    kl_k3,
    masked_mean,
    policy_loss,
    sampler_correction,
)
from minigrpo.checkpoint import checkpoints
from minigrpo.compat import unwrap_model
from minigrpo.config import Config
from minigrpo.dist import Distributed
from minigrpo.errors import ConfigError, NonFiniteError, TrainingStopped
from minigrpo.logprobs import policy_logprobs
from minigrpo.model import Reference
from minigrpo.monitor import peak_memory_gb, print0
from minigrpo.rollout.overlap import Batch, Generator, GeneratorError, saved_batch
from minigrpo.rollout.types import Rollout, SamplingParams, merge_rollouts, select_rows
from minigrpo.run import (
    Inputs,
    Interrupt,
    LoopState,
    PromptSampler,
    Run,
    end_step,
    finish_run,
    prepare_training,
    resume_hint,
    run_eval,
    setup_run,
    start_loop,
    step_schedule,
)
from minigrpo.tasks.answers import is_correct
from minigrpo.tasks.prompts import stop_strings
from minigrpo.tasks.rewards import RewardGuard, load_rewards, reward_inputs, score
from minigrpo.tasks.sources import Example


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
                      sampling: SamplingParams, guard: RewardGuard | None = None) -> Scored:
    """Sample G completions per prompt, then score each with every reward function (time-limited by `guard`)."""
    ro, seconds = generate_rollout(cfg, model, tokenizer, examples, prompts, sampling)
    return score_rollout(ro, examples, reward_funcs, sampling.n, guard, seconds)


def generate_rollout(cfg: Config, model: torch.nn.Module, tokenizer: Any, examples: list[Example],
                     prompts: list[str], sampling: SamplingParams) -> tuple[Rollout, float]:
    """G completions per prompt from the configured backend, and the seconds they took."""
    t0 = time.perf_counter()
    if sampling.turns is not None:  # an environment is reset with each trajectory's row
        sampling = dataclasses.replace(sampling, turns=sampling.turns.bound([ex.columns for ex in examples],
                                                                            sampling.n))
    ro = rollout.generate(cfg.rollout_backend, model, tokenizer, prompts, sampling, cfg.rollout_merge_lora)
    return ro, time.perf_counter() - t0


def score_rollout(ro: Rollout, examples: list[Example], reward_funcs: list[tuple[str, Callable, float]], n: int,
                  guard: RewardGuard | None, generate_s: float) -> Scored:
    """Score each of a rollout's completions (n per example) with every reward function."""
    t1 = time.perf_counter()
    reward_prompts, completions, columns = reward_inputs(examples, ro.prompts, ro.completions, n, ro.stats)
    lengths = ro.completion_mask.sum(1).long().tolist()
    ids = [row[:length] for row, length in zip(ro.completion_ids.tolist(), lengths)]  # TRL passes these too
    errors: dict[str, int] = {}
    totals, per_func = score(reward_funcs, reward_prompts, completions, columns | {"completion_ids": ids}, errors,
                             guard)
    return Scored(ro, columns, totals, per_func, generate_s, time.perf_counter() - t1, sum(errors.values()))


def tool_metrics(stats: dict[str, list[float]]) -> dict[str, float]:
    """A multi-turn batch's tool use: assistant turns and tool calls per sample, the share of samples that called a
    tool (tools/call_frequency), the share of calls that failed (tools/failure_frequency: raised, timed out or
    malformed), and the seconds the calls took in all; with an environment, its mean reward over the trajectories
    it scored (env/reward), its failures (env/errors) and seconds (env/env_s)."""
    n, calls = len(stats["turns"]), sum(stats["tool_calls"])
    metrics = {"tools/turns": sum(stats["turns"]) / n, "tools/calls": calls / n,
               "tools/call_frequency": sum(c > 0 for c in stats["tool_calls"]) / n,
               "tools/failure_frequency": sum(stats["tool_errors"]) / calls if calls else 0.0,
               "tools/tool_s": sum(stats["tool_s"])}
    if "env_reward" in stats:
        scored = [r for r in stats["env_reward"] if not math.isnan(r)]  # NaN: the environment failed
        metrics |= {"env/reward": sum(scored) / max(len(scored), 1), "env/errors": sum(stats["env_errors"]),
                    "env/env_s": sum(stats["env_s"])}
    return metrics


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


class SamplerCheck:
    """The sampler/trainer mismatch of a step, micro-batch by micro-batch: the rollout's log-probs of its sampled
    tokens (`Rollout.logprobs`, from the backend) against the trainer's before any update, and, with
    vllm_importance_sampling_correction under rollout_backend vllm or a rollout_dtype other than dtype
    (numerics) or max_staleness > 0 (a policy k updates old), the correction's weights (algo.py). Each
    micro-batch's figures stay on the device; `metrics` reads them all at once (one sync per step)."""

    def __init__(self, cfg: Config, stale: bool = False) -> None:
        self.cfg = cfg
        self.correct = cfg.vllm_importance_sampling_correction and (cfg.rollout_backend == "vllm" or
                                                                    cfg.max_staleness > 0 or stale or
                                                                    cfg.rollout_cast is not None)
        self.parts: list[torch.Tensor] = []  # per micro-batch: tokens, sum |d|, max |d|, sum k3, and the ratios'
        # count, sum, min, max, how many fell outside the bounds

    def weights(self, trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                ) -> torch.Tensor | None:
        """Record one micro-batch [b, C]; the correction's weights [b, C], or None when it is off."""
        cfg = self.cfg
        known = mask.bool() & torch.isfinite(sampler_logp)
        t, s = trainer_logp.float(), torch.where(known, sampler_logp.float(), trainer_logp.float())
        gap = (t - s).abs()  # 0 where unknown
        stats = [known.sum(), gap.sum(), gap.amax(), kl_k3(s, t).sum()]  # k3: KL(sampler || trainer)
        weights = None
        if self.correct:
            weights, ratio = sampler_correction(trainer_logp, sampler_logp, mask, cfg.vllm_importance_sampling_mode,
                                                cfg.vllm_importance_sampling_clip_min,
                                                cfg.vllm_importance_sampling_clip_max)
            # one ratio per sequence (its completion's tokens share it) or per token
            sequence = cfg.vllm_importance_sampling_mode.startswith("sequence")
            r, counted = (ratio[:, 0], mask.sum(1) > 0) if sequence else (ratio, known)
            outside = (r < cfg.vllm_importance_sampling_clip_min) | (r > cfg.vllm_importance_sampling_clip_max)
            stats += [counted.sum(), torch.where(counted, r, 0.0).sum(), torch.where(counted, r, torch.inf).amin(),
                      torch.where(counted, r, -torch.inf).amax(), (outside & counted).sum(),
                      torch.where(counted, r.double() ** 2, 0.0).sum()]
        self.parts.append(torch.stack([x.double() for x in stats]))
        return weights

    def metrics(self) -> dict[str, float]:
        """rollout/logprob_diff_mean and _max (|sampler - trainer| per token), rollout/sampler_kl (k3), and the
        correction's ratios (mean, spread, extremes) and the share of them truncated or masked; NaN, not missing,
        when nothing counted (every process logs the same keys). Nothing when the backend reports no log-probs (hf)."""
        if not self.parts:
            return {}
        parts = torch.stack(self.parts).cpu()  # [micro-batches, stats]: the one sync
        tokens, nan = parts[:, 0].sum().item(), float("nan")
        out = {"rollout/logprob_diff_mean": parts[:, 1].sum().item() / tokens if tokens else nan,
               "rollout/logprob_diff_max": parts[:, 2].max().item() if tokens else nan,
               "rollout/sampler_kl": parts[:, 3].sum().item() / tokens if tokens else nan}
        if self.correct:
            units = parts[:, 4].sum().item()
            mean = parts[:, 5].sum().item() / units if units else nan
            out |= {"rollout/is_ratio_mean": mean,
                    "rollout/is_ratio_std": math.sqrt(max(parts[:, 9].sum().item() / units - mean ** 2, 0.0))
                    if units else nan,
                    "rollout/is_ratio_min": parts[:, 6].min().item() if units else nan,
                    "rollout/is_ratio_max": parts[:, 7].max().item() if units else nan,
                    "rollout/is_clipped_frac": parts[:, 8].sum().item() / units if units else nan}
        return out


def entropy_control_of(cfg: Config) -> EntropyControl:
    """The entropy bonus's coefficient as configured (fixed, or adaptive from entropy_coef)."""
    return EntropyControl(cfg.entropy_coef, cfg.use_adaptive_entropy, cfg.entropy_target, cfg.entropy_coef_delta,
                          cfg.entropy_coef_min, cfg.entropy_coef_max)


def update_policy(model: torch.nn.Module, ref: Reference | None, ro: Rollout, advantages: torch.Tensor,
                  loss_mask: torch.Tensor, cfg: Config, optimizer: torch.optim.Optimizer,
                  scheduler: Any, dist: Distributed | None = None, wrapped: torch.nn.Module | None = None,
                  stale: bool = False, entropy_control: EntropyControl | None = None) -> dict[str, float]:
    """num_iterations clipped-surrogate updates on one rollout; returns the step's loss statistics.

    With several processes, `wrapped` is the strategy's model (DDP, DeepSpeed or FSDP: each averages gradients
    over processes): the normalising counts are the global ones and each loss is scaled by the world size,
    so the gradient is the one-process gradient of the whole global batch. `stale`: the rollout was sampled by an
    older policy (overlapped rollouts): its log-probs correct the loss whatever the backend. `entropy_control`: the
    entropy bonus's coefficient (default: cfg's, fixed), updated after each optimizer step when adaptive."""
    dist, wrapped = dist or Distributed(), wrapped or model
    input_ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)  # [B, P+C]
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)  # [B, P+C]
    C, mb = ro.completion_ids.shape[1], cfg.per_device_train_batch_size
    targets = None if ro.tool_mask is None else ro.generated_mask  # multi-turn: tool answers are context only
    micro = [slice(i, i + mb) for i in range(0, input_ids.shape[0], mb)]
    # Micro-batches of whole groups run each prompt once (shared prefix); otherwise every row in full.
    group_size = cfg.num_generations if mb % cfg.num_generations == 0 else 1
    sequences, tokens, micro_batches = dist.sum([input_ids.shape[0], float(loss_mask.sum()), len(micro)])
    norm = Norm(num_sequences=int(sequences), num_tokens=int(tokens), num_micro_batches=int(micro_batches),
                max_completion_length=cfg.max_completion_length)
    ref_logp: list[torch.Tensor | None] = [None] * len(micro)
    if ref is not None:  # reference log-probs once per rollout, no graph
        with torch.no_grad(), ref.active() as ref_model:
            ref_logp = [policy_logprobs(ref_model, input_ids[s], attention[s], C, cfg.temperature, group_size,
                                        cfg.logprob_chunk_size, None if targets is None else targets[s])[0]
                        for s in micro]
    old_logp: list[torch.Tensor | None] = [None] * len(micro)
    sampler, weights = SamplerCheck(cfg, stale), [None] * len(micro)  # the backend's log-probs against the trainer's
    sums = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "ratio": 0.0}
    if cfg.top_entropy_quantile < 1:
        sums["entropy_kept"] = 0.0
    if cfg.off_policy_mask_threshold is not None:
        sums["off_policy_masked"] = 0.0
    control = entropy_control or entropy_control_of(cfg)
    bonus_on = bool(cfg.entropy_coef or cfg.use_adaptive_entropy)
    if bonus_on:  # the loss without the bonus, and the coefficient each update applied
        sums |= {"policy_loss": 0.0, "entropy_coef_applied": 0.0}
    # what the optimizer updates (a walk over the model's parameters costs ~0.2 ms a step; so does train() when the
    # model already is in train mode: then both the wrapper peft made and the model inside it are; peft's wrapper of a
    # freshly loaded model is in train mode around a model in eval mode)
    params, grad_norms, skipped = [p for group in optimizer.param_groups for p in group["params"]], [], 0
    if not (model.training and unwrap_model(model).training):
        model.train()
    for _ in range(cfg.num_iterations):
        finite, coef, measured = True, control.applied(), [0.0, 0.0]  # a non-finite loss skips the update
        for j, s in enumerate(micro):
            logp, entropy = policy_logprobs(wrapped, input_ids[s], attention[s], C, cfg.temperature, group_size,
                                            cfg.logprob_chunk_size, None if targets is None else targets[s])
            if old_logp[j] is None:  # no update has happened yet: the current policy IS the sampler
                old_logp[j] = logp.detach()  # (up to the backend's numerics: compared here, corrected for vLLM)
                if ro.logprobs is not None:
                    weights[j] = sampler.weights(old_logp[j], ro.logprobs[s], ro.generated_mask[s])
            selected = None  # the top entropy quantile of the micro-batch's valid tokens, over every process
            if cfg.top_entropy_quantile < 1:
                pooled = dist.gather_uneven(entropy.detach()[loss_mask[s].bool()])
                selected = high_entropy_mask(entropy, loss_mask[s], cfg.top_entropy_quantile, pooled)
            out = policy_loss(logp, old_logp[j], advantages[s], loss_mask[s], epsilon=cfg.epsilon,
                              epsilon_high=cfg.epsilon_high, beta=cfg.beta, ref_logp=ref_logp[j],
                              level=cfg.importance_sampling_level, dual_clip=cfg.dual_clip,
                              sampler_weights=weights[j], loss_mode=cfg.loss_mode,
                              delta=cfg.delta, sapo_temperatures=(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg),
                              vespo_params=(cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg,
                                            cfg.vespo_lambda_neg),
                              unbiased_kl=cfg.use_bias_correction_kl,
                              off_policy_threshold=cfg.off_policy_mask_threshold,
                              sampler_logp=None if ro.logprobs is None else ro.logprobs[s], token_mask=selected)
            loss = LOSS_TYPES[cfg.loss_type](out.per_token, loss_mask[s], norm)
            chosen = loss_mask[s] if selected is None else loss_mask[s] * selected  # the bonus's tokens
            bonus = coef * entropy_bonus(entropy, chosen, norm) if coef else 0.0  # whatever the aggregation
            loss = loss - bonus
            if control.adaptive:  # the entropy the controller steers: over the bonus's tokens
                measured[0] += float((entropy.detach() * chosen).sum())
                measured[1] += float(chosen.sum())
            # the strategy averages over processes; the norm already counts them all
            dist.backward(loss * dist.world, last=j == len(micro) - 1)
            # token-weighted over the global batch: the mean over processes of these is the global token mean
            share = loss_mask[s].sum().item() * dist.world / max(tokens, 1) / cfg.num_iterations
            value = loss.item()
            finite = finite and math.isfinite(value)
            sums["loss"] += value * dist.world / cfg.num_iterations  # averaged over processes: the total
            if bonus_on:
                sums["policy_loss"] += (value + (bonus.item() if torch.is_tensor(bonus) else 0.0)) * dist.world \
                    / cfg.num_iterations
            for key, value in (("kl", out.kl), ("clip_ratio", out.clipped), ("entropy", entropy.detach()),
                               ("ratio", out.ratio), ("entropy_kept", selected),
                               ("off_policy_masked", None if out.kept is None else 1 - out.kept.expand_as(logp))):
                if value is not None:
                    sums[key] += masked_mean(value, loss_mask[s]).item() * share
        grad_norm, applied = dist.step(optimizer, params, cfg.max_grad_norm, finite)  # clip; a non-finite
        grad_norms.append(grad_norm)  # loss or gradient would poison the weights: that update is skipped
        skipped += not applied
        step_schedule(scheduler)  # skipped updates count too
        if bonus_on:
            sums["entropy_coef_applied"] += coef / cfg.num_iterations
        if control.adaptive:  # the next update's coefficient, from this batch's entropy over every process
            entropy_sum, count = dist.sum(measured)
            control.update(entropy_sum / max(count, 1))
    coefficient = {"train/entropy_coef": control.coef} if bonus_on else {}  # the controller's, as TRL logs it
    return {f"train/{k}": v for k, v in sums.items()} | sampler.metrics() | coefficient | {
        "train/grad_norm": sum(grad_norms) / len(grad_norms), "train/skipped_updates": float(skipped)}


def sample_batch(run: Run, state: LoopState, n: int, reward_funcs: list[tuple[str, Callable, float]],
                 sampling: SamplingParams, guard: RewardGuard) -> Scored:
    """Phases 1-3 for this process's n of the next prompts of the data order: rollout, then rewards.

    Every process draws the prompts of all (the same draw) and keeps its share. Each prompt samples from its
    own seed (the run's seed and its place in the data stream): its completions do not depend on what else is
    in the batch, or on which process draws them."""
    idx, seeds = draw(run, state, n)
    # ZeRO-3 / FSDP: whole weights while generating
    with overflow_errors(run, state.step + 1), run.dist.full_weights(run.model):
        return rollout_and_score(run.cfg, run.model, run.tokenizer, [run.train_set[i] for i in idx],
                                 [run.train_prompts[i] for i in idx], reward_funcs,
                                 dataclasses.replace(sampling, seeds=seeds), guard)


def draw(run: Run, state: LoopState, n: int) -> tuple[list[int], list[int]]:
    """This process's n of the next prompts of the data order (dataset rows) and their sampling seeds."""
    cfg, dist = run.cfg, run.dist
    seeds = [cfg.seed * 1_000_003 + state.sampler.drawn + i for i in range(n * dist.world)]
    idx = state.sampler.take(n * dist.world)
    mine = slice(dist.rank * n, (dist.rank + 1) * n)
    return idx[mine], seeds[mine]


@contextlib.contextmanager
def overflow_errors(run: Run, step: int) -> Iterator[None]:
    """The policy's logits overflowing while sampling the batch of `step` (the last update broke the weights:
    nothing here is worth saving) stops the run with what to do."""
    try:
        yield
    except NonFiniteError as e:
        found = checkpoints(run.run_dir)
        then = (f"resume from the last checkpoint, {found[-1][1].name}, with a lower one: --resume {run.run_dir} "
                f"--learning_rate=... --resume_allow_changes=learning_rate") if found else \
            "start again with a lower one (the run has no checkpoint: save_steps 0)"
        raise TrainingStopped(f"step {step}: {e} (after {step - 1} steps at learning_rate "
                              f"{run.cfg.learning_rate:g}): an update made them so large that the model overflows. "
                              f"Nothing was saved; {then}") from e


def start_generator(run: Run, always: bool = False) -> Generator | None:
    """max_staleness k > 0: the generator process (rollout/overlap.py), started; `feed_generator` gives it work.
    None for the synchronous loop (`always`: the process even at k = 0, each batch then sampled after the update
    before it: the lockstep test that the process reproduces the synchronous loop bit for bit)."""
    cfg = run.cfg
    if not (cfg.max_staleness or always):
        return None
    return Generator(run.model, run.tokenizer, cfg.rollout_backend, cfg.rollout_merge_lora, cfg.max_staleness,
                     cfg.generator_timeout, cfg.num_threads)


def feed_generator(run: Run, state: LoopState, gen: Generator, sampling: SamplingParams) -> None:
    """Once the loop knows where it starts (a resume): the batches a checkpoint kept restored, the current weights
    pushed, and the batches up to k steps ahead submitted."""
    gen.last_step = state.step
    gen.restore(state.pending)
    state.pending, state.generator = [], gen
    gen.push(run.model, state.step)
    gen.resubmit([[run.train_prompts[i] for i in b.rows] for b in gen.unsent], sampling)
    submit_ahead(run, state, gen, sampling, done=state.step)


def submit_ahead(run: Run, state: LoopState, gen: Generator, sampling: SamplingParams, done: int) -> None:
    """After step `done` (its weights pushed): queue the batches up to step done+1+k (none past max_steps), each
    sampled with the weights of `done`. Batches a resume restored may already reach further (a larger k before)."""
    while gen.last_step < min(done + 1 + run.cfg.max_staleness, run.cfg.max_steps):
        submit_next(run, state, gen, sampling, version=done)


def submit_next(run: Run, state: LoopState, gen: Generator, sampling: SamplingParams, version: int) -> None:
    """Draw the prompts of the next step not submitted yet and queue them, to be sampled with `version`."""
    rows, seeds = draw(run, state, run.cfg.prompts_per_step)
    gen.submit(Batch(gen.last_step + 1, version, rows, seeds), [run.train_prompts[i] for i in rows], sampling)


@contextlib.contextmanager
def generator_errors(run: Run, step: int) -> Iterator[None]:
    """A GeneratorError inside says, besides what happened, the step and where the last checkpoint is."""
    try:
        yield
    except GeneratorError as e:
        found = checkpoints(run.run_dir)
        then = (f"the last checkpoint is {found[-1][1]}: continue with {resume_hint(run)}" if found
                else "the run has no checkpoint yet")
        raise GeneratorError(f"step {step}: {e}. {then}") from e


def sample_kept(run: Run, state: LoopState, sampling: SamplingParams) -> None:
    """Resumed with max_staleness 0 from a checkpoint of overlapped rollouts: sample now, with the checkpoint's
    weights (theirs), the batches it kept as requests, as the generator process would have."""
    for i, saved in enumerate(state.pending):
        if saved["rollout"] is None:
            rows = saved["rows"]
            with overflow_errors(run, state.step + 1), run.dist.full_weights(run.model):
                ro, seconds = generate_rollout(run.cfg, run.model, run.tokenizer, [run.train_set[r] for r in rows],
                                               [run.train_prompts[r] for r in rows],
                                               dataclasses.replace(sampling, seeds=saved["seeds"]))
            state.pending[i] = saved | {"rollout": dataclasses.asdict(ro), "generate_s": seconds}


def take_ahead(run: Run, step: int, state: LoopState, generator: Generator | None) -> Batch | None:
    """The batch of `step` if it was sampled ahead: by the generator process, or before a resume (the checkpoint
    kept it, and the data order is past its prompts). None: the loop samples it now."""
    if state.pending:  # a run resumed with max_staleness 0 from a checkpoint of overlapped rollouts
        batch = saved_batch(state.pending.pop(0))
    elif generator is None:
        return None
    else:
        with overflow_errors(run, step), generator_errors(run, step):
            batch = generator.take()
    if batch.step != step:  # batches are taken in order: a bug if not
        raise RuntimeError(f"step {step} took the batch of step {batch.step}")
    return batch


def check_sampler(cfg: Config, step: int, metrics: dict[str, float], run: Run) -> None:
    """Stop the run (TrainingStopped) when the sampler's log-probs are further from the trainer's than
    vllm_logprob_tolerance: the sampler did not generate with the policy's weights (a push that did not arrive)."""
    diff = metrics.get("rollout/logprob_diff_mean")
    if not cfg.vllm_logprob_tolerance or diff is None or diff <= cfg.vllm_logprob_tolerance:
        return
    found = checkpoints(run.run_dir)
    then = f"the last checkpoint is {found[-1][1]}" if found else "the run has no checkpoint"
    raise TrainingStopped(f"step {step}: the {cfg.rollout_backend} backend's log-probs of its sampled tokens differ "
                          f"from the trainer's by {diff:.3g} on average (vllm_logprob_tolerance "
                          f"{cfg.vllm_logprob_tolerance:g}): it did not sample with the policy's weights (a weight "
                          f"push that did not arrive, or a model it runs differently). This step's update is not "
                          f"saved; {then}")


def no_signal_cause(steps: int, scored: Scored, guard: RewardGuard, estimator: str = "grpo", G: int = 0) -> str:
    """Why `steps` steps in a row carried no learning signal (every advantage 0), from this step's rewards, the
    advantage estimator and what the reward guard saw: the warning's words."""
    head = f"no learning signal for {steps} steps in a row: "
    values = [t for t in scored.totals if t is not None]
    if not values:
        causes = [f"reward {name!r} is disabled after timeouts" for name in sorted(guard.disabled)]
        causes += [f"reward {name!r} returned values that are not finite numbers ({count} so far, e.g. {example})"
                   for name, (count, example) in guard.invalid.items()]
        if scored.reward_errors:
            causes.append(f"rewards raised on {scored.reward_errors} samples (train/reward_errors)")
        if (stats := scored.rollout.stats) and (failed := sum(stats.get("env_errors", []))):
            causes.append(f"the environment failed on {failed:g} trajectories (env/errors; its first traceback was "
                          f"printed)")
        return head + "every sample was skipped, no reward scored one: " + "; ".join(
            causes or ["every reward returned None"]) + ". A reward must return finite numbers."
    if len(set(values)) == 1:
        return head + (f"every completion got the same reward {values[0]:g}. The task may be too hard for the model "
                       f"(no completion right: look at samples.jsonl, the template, max_completion_length), too "
                       f"easy, or the rewards may not depend on the completion (or its answer column)")
    if estimator == "grpo_passk" and G and not all(flat_groups(scored.totals, G)):
        return head + ("adv_estimator grpo_passk gives a group's best sample its margin over the second best, and "
                       "every group's best reward is tied (two or more samples share it): that is 0 everywhere. "
                       "With 0/1 rewards it learns only from groups with a single success; use grpo or rloo")
    return head + ("within each group the rewards are equal (groups differ from each other): the G samples of a "
                   "prompt end alike; raise temperature or num_generations")


# How each metric of a step is reduced over processes (reduce_metrics): mean unless named here.
REDUCTIONS = {"completions/max_length": "max", "train/skipped_samples": "sum", "train/reward_errors": "sum",
              "train/reward_timeouts": "sum",
              "perf/generate_s": "max", "perf/score_s": "max", "perf/train_s": "max", "perf/step_s": "max",
              "perf/tokens_per_s": "max", "perf/wait_s": "max", "perf/push_s": "max", "memory/peak_gb": "max",
              "rollout/logprob_diff_max": "max",
              "rollout/is_ratio_max": "max", "rollout/is_ratio_min": "min", "tools/tool_s": "max", "env/errors": "sum",
              "env/env_s": "max"}


def train(cfg: Config, show_progress: bool = True) -> Path:
    """Run GRPO as configured; returns the run folder (config, metrics, TensorBoard, samples, adapter)."""
    return run_grpo(cfg, show_progress).run_dir


def run_grpo(cfg: Config, show_progress: bool = True, inputs: Inputs | None = None) -> Run:
    """Run GRPO as configured; returns the run (folder, and the trained model and tokenizer in memory).
    `inputs`: what the Python API hands over besides the config (a loaded model, rows, callbacks)."""
    # ---- setup ----------------------------------------------------------------------------------------
    cfg.validate_grpo()
    reward_funcs = load_rewards(cfg)
    guard = RewardGuard(cfg.reward_timeout, cfg.reward_timeout_limit)  # time limits; what rewards did wrong
    run = setup_run(cfg, "GRPO", inputs)
    cfg = run.cfg  # as resolved at start (the template "auto" made concrete)
    if cfg.rollout_cast and run.dist.sharded and cfg.rollout_backend != "vllm":
        raise ConfigError(f"rollout_dtype: {cfg.rollout_dtype} casts a copy of whole weights for sampling; under "
                          f"{run.dist.strategy} (ZeRO-3 / FSDP) they are sharded: use DDP or ZeRO-2, or "
                          f"rollout_dtype: auto")
    if cfg.max_staleness and run.dist.sharded:
        raise ConfigError(f"max_staleness: {cfg.max_staleness} (overlapped rollouts) needs every process to hold "
                          f"whole weights; under {run.dist.strategy} (ZeRO-3 / FSDP) they are sharded: use DDP or "
                          f"ZeRO-2, or max_staleness: 0")
    model, tok, dist, device, G = run.model, run.tokenizer, run.dist, run.device, cfg.num_generations
    ref = Reference(model, cfg.use_peft) if cfg.beta > 0 else None  # before the strategy may split the weights
    # The strategy (DDP, DeepSpeed, FSDP with several processes) takes the model and optimizer; the loss pass
    # goes through opt.wrapped. One plain process: wrapped is the model.
    opt = prepare_training(run, cfg.max_steps * cfg.num_iterations)
    state = LoopState(PromptSampler(len(run.train_set), cfg.seed),
                      entropy=entropy_control_of(cfg))
    sampling = SamplingParams(n=G, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, stop=stop_strings(cfg), turns=multi_turn(cfg),
                              weights_dtype=cfg.rollout_cast, engine_decode=cfg.engine_decode)
    # max_staleness k > 0: a generator process samples the next k batches while this one trains; started before
    # the evaluation start_loop runs, so that its start-up (seconds of imports) happens meanwhile
    generator, monitor = start_generator(run), None
    try:
        monitor = start_loop(run, opt, state, show_progress)  # resume, or evaluate before training
        if generator is not None:
            feed_generator(run, state, generator, sampling)
        else:
            sample_kept(run, state, sampling)  # resumed at k = 0 from a checkpoint of overlapped rollouts
    except BaseException:
        for opened in (generator, monitor):
            if opened is not None:
                opened.close()
        raise

    # Ctrl-C: finish the step, save a checkpoint, stop; again: stop at once. An error closes the monitor (and
    # stops the generator).
    with Interrupt() as interrupt, monitor, generator or contextlib.nullcontext():
        for step in range(state.step + 1, cfg.max_steps + 1):
            t0, timeouts, reward_s = time.perf_counter(), guard.timeouts, dict(guard.seconds)
            # ---- 1-3. prompts -> rollout (G completions each) -> rewards --------------------------------------
            # sampled ahead (by the generator, or kept by a checkpoint), or None: sampled here and now
            ahead = take_ahead(run, step, state, generator)
            wait_s = time.perf_counter() - t0
            if ahead is not None:
                examples = [run.train_set[i] for i in ahead.rows]
                parts = [score_rollout(ahead.rollout, examples, reward_funcs, G, guard, ahead.generate_s)]
            else:
                parts = [sample_batch(run, state, cfg.prompts_per_step, reward_funcs, sampling, guard)]
            # DAPO dynamic sampling: groups whose rewards are all equal carry no signal; draw fresh prompts.
            while cfg.dynamic_sampling and len(parts) < cfg.max_sampling_tries:
                missing = cfg.prompts_per_step - sum(not f for p in parts for f in flat_groups(p.totals, G))
                missing = int(dist.max(missing))  # every process draws as many: the prompt stream stays shared
                if missing <= 0:
                    break
                parts.append(sample_batch(run, state, missing, reward_funcs, sampling, guard))
            scored = keep_informative(parts, cfg.prompts_per_step, G, tok.pad_token_id) if len(parts) > 1 \
                else parts[0]
            ro, totals, columns = scored.rollout, scored.totals, scored.columns
            informative = sum(not f for f in flat_groups(totals, G))
            if cfg.dynamic_sampling and informative < cfg.prompts_per_step:
                print0(f"step {step}: dynamic sampling hit max_sampling_tries={cfg.max_sampling_tries} with "
                       f"{informative}/{cfg.prompts_per_step} informative groups; the rest have no signal")
            # the task's accuracy, when its rows have gold answers (independent of the reward weights)
            correct = [is_correct(c, a) for c, a in zip(ro.completions, columns["answer"])] \
                if all(a is not None for a in columns.get("answer", [None])) else None
            # ---- 4. advantages ----------------------------------------------------------------------------
            valid = torch.tensor([r is not None for r in totals], dtype=torch.float32)
            rewards = torch.tensor([r if r is not None else 0.0 for r in totals], dtype=torch.float32)
            # Over the global batch (every process's rewards, in process order), then this process's rows:
            # per group it is the same thing, and scale_rewards: batch takes the std of the whole batch.
            # the tokens that may reach the loss: generated ones (tool answers are context), truncated rows out
            trained = ro.generated_mask * (~ro.truncated).float()[:, None] if cfg.mask_truncated_completions \
                else ro.generated_mask
            if cfg.multi_objective_aggregation == "normalize_then_sum":  # GDPO: each function normalised first
                per_func = torch.tensor([[math.nan if v is None else v for v in scored.per_func[name]]
                                         for name, _, _ in reward_funcs], dtype=torch.float32).T  # [B, K]
                weights = torch.tensor([w for _, _, w in reward_funcs], dtype=torch.float64)
                decoupled = decoupled_rewards(dist.gather(per_func), weights, G)  # NaN: skipped (valid 0)
                advantages, zero_std = group_advantages(decoupled.nan_to_num(0.0), dist.gather(valid), G, "batch",
                                                        cfg.std_floor)
            else:  # loss tokens per completion (drop_zero_std_groups is refused with REINFORCE++, which uses them)
                lengths = trained.sum(1).float().cpu()
                advantages, zero_std = group_advantages(dist.gather(rewards), dist.gather(valid), G,
                                                        cfg.scale_rewards, cfg.std_floor, estimator=cfg.adv_estimator,
                                                        lengths=dist.gather(lengths))
            moved = bool((advantages != 0).any())  # some completion of the global batch has a learning signal
            mine = slice(dist.rank * len(rewards), (dist.rank + 1) * len(rewards))
            advantages, zero_std = advantages[mine], zero_std[mine.start // G:mine.stop // G]
            keep = valid * (~zero_std).float().repeat_interleave(G) if cfg.drop_zero_std_groups else valid
            loss_mask = trained * keep.to(device)[:, None]  # skipped samples leave it too
            t_score = time.perf_counter()
            # ---- 5. loss and update (reference and old log-probs inside) ----------------------------------
            stale = ahead is not None and ahead.version < step - 1  # sampled by an older policy: corrected
            stats = update_policy(model, ref, ro, advantages.to(device), loss_mask, cfg, opt.optimizer,
                                  opt.scheduler, dist, opt.wrapped, stale=stale, entropy_control=state.entropy)
            t_trained, push_s = time.perf_counter(), 0.0
            if generator is not None:  # the new weights, and the batch k steps ahead sampled with them
                push_s = generator.push(model, step)
                submit_ahead(run, state, generator, sampling, done=step)
            t_end = time.perf_counter()
            # ---- 6. logging -------------------------------------------------------------------------------
            lengths = ro.completion_mask.sum(1)
            metrics = stats | {
                "train/reward": masked_mean(rewards, valid).item() if valid.any() else float("nan"),
                "train/reward_std": rewards[valid.bool()].std().item() if valid.sum() > 1 else 0.0,
                "train/frac_reward_zero_std": zero_std.float().mean().item(),
                "train/skipped_samples": float(len(totals) - int(valid.sum())),
                "train/reward_errors": float(scored.reward_errors),
                "train/reward_timeouts": float(guard.timeouts - timeouts),
                "train/learning_rate": opt.scheduler.get_last_lr()[0],
                "completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
                "completions/truncated_ratio": ro.truncated.float().mean().item(),
                "train/sampling_tries": float(len(parts)), "train/informative_groups": float(informative),
                "perf/generate_s": scored.generate_s, "perf/score_s": scored.score_s,
                **{f"perf/reward/{name}_s": guard.seconds.get(name, 0.0) - reward_s.get(name, 0.0)
                   for name, _, _ in reward_funcs},  # each reward's own seconds (slow and async ones overlap)
                "perf/train_s": t_trained - t_score, "perf/step_s": t_end - t0,
                "rollout/staleness": float(step - 1 - ahead.version) if ahead is not None else 0.0,
                "perf/tokens_per_s": ro.num_completion_tokens / (t_end - t0),
                "memory/peak_gb": peak_memory_gb(device),
            }
            if correct is not None:
                metrics["train/accuracy"] = sum(correct) / len(correct)
            if generator is not None:  # how long this step waited for its batch, and handed its weights over
                metrics |= {"perf/wait_s": wait_s, "perf/push_s": push_s}
            if ro.stats is not None:  # multi-turn: how the tools were used (TRL's call / failure frequencies)
                metrics |= tool_metrics(ro.stats)
            for name, values in scored.per_func.items():  # each reward's mean and spread (TRL's names)
                vals = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
                metrics[f"train/rewards/{name}/mean"] = vals.mean().item() if len(vals) else float("nan")
                metrics[f"train/rewards/{name}/std"] = vals.std().item() if len(vals) > 1 else 0.0
            scored_adv = advantages[valid.bool()]  # what the tutorial says to watch: ~0 mean, spread > 0
            metrics["train/advantage_mean"] = scored_adv.mean().item() if len(scored_adv) else 0.0
            metrics["train/advantage_std"] = scored_adv.std().item() if len(scored_adv) > 1 else 0.0
            if step % cfg.logging_steps == 0:  # the completions table: a group's first samples
                gold = columns.get("answer") or [None] * len(totals)
                monitor.samples(step, [{"prompt": ro.prompts[i], "completion": ro.completions[i], "reward": totals[i],
                                        **{f"rewards/{k}": v[i] for k, v in scored.per_func.items()},
                                        "advantage": advantages[i].item(), "answer": gold[i]}
                                       for i in range(min(cfg.log_completions, G))])
            # ---- 7. evaluation, checkpoint, guards (a run that learns nothing says so, and why) --------------
            quiet = not moved  # no completion of the global batch has a non-zero advantage
            state.quiet_streak = state.quiet_streak + 1 if quiet else 0
            if cfg.no_signal_steps and quiet and state.quiet_streak % cfg.no_signal_steps == 0:
                print0(f"[bold red]warning:[/] step {step}: "
                       f"{no_signal_cause(state.quiet_streak, scored, guard, cfg.adv_estimator, G)}")
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
                metrics |= run_eval(run)
            metrics = dist.reduce_metrics(metrics, REDUCTIONS | {k: "max" for k in metrics
                                                                 if k.startswith("perf/reward/")})
            monitor.log(step, metrics)
            if not stale:  # a stale batch's policy differs from the trainer's by design
                check_sampler(cfg, step, metrics, run)
            with generator_errors(run, step):  # a checkpoint waits for the batches in flight
                end_step(run, opt, state, monitor, interrupt, step,
                         all_skipped=stats["train/skipped_updates"] == cfg.num_iterations)

    # ---- end: final evaluation, the trained policy, curves ---------------------------------------------------
    finish_run(run, monitor, state.before)
    return run
