"""Supervised fine-tuning: the cold-start stage of the R1 recipe (and the SFT after rejection sampling).

Same config, run folder, logging, evaluation, checkpoints, `--resume`, Ctrl-C and bad-step guard as `train`
(the run machinery of run.py). The data is any dataset `train` reads: the target of each problem is its
worked solution reformatted to end in `#### N` (`sources.sft_target`), so GSM8K solutions, the arith task's
solutions and rejection-sampled JSONL (`minigrpo sample`) all work. The loss is the mean cross-entropy of
the target tokens (EOS included), prompt tokens masked out. A `completion` that is a conversation with tool
messages trains its assistant turns only (`encode_pairs`). GRPO's rules (groups, rewards) do not apply.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minigrpo.agent.turns import render_after_turn, turn_end_id
from minigrpo.config import Config
from minigrpo.model import trainable_parameters
from minigrpo.run import (
    Inputs,
    Interrupt,
    LoopState,
    PromptSampler,
    Run,
    end_step,
    finish_run,
    prepare_training,
    run_eval,
    setup_run,
    start_loop,
    step_schedule,
)
from minigrpo.tasks.sources import sft_conversation, sft_target


def encode_pairs(tokenizer: Any, prompts: list[str], targets: list[str | list[dict[str, str]]],
                 ) -> list[tuple[list[int], list[int]]]:
    """Token ids of prompt + target, and which of them are trained (1) or context (0). A text target is trained
    whole, with the EOS after it. A conversation (`sft_conversation`: assistant turns with tool messages between
    them) trains its assistant turns (content + EOS); what the chat template writes for the messages between them
    is context, the very tokens a multi-turn rollout feeds (agent/turns.py `render_after_turn`)."""
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    out = []
    for p, target in zip(p_ids, targets):
        ids, mask = list(p), [0] * len(p)
        if isinstance(target, str):
            turn = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            out.append((ids + turn, mask + [1] * len(turn)))
            continue
        end = turn_end_id(tokenizer)  # a conversation's turns end as the chat template ends them
        pending: list[dict[str, str]] = []  # messages since the last assistant turn
        for m in target:
            if m["role"] != "assistant":
                pending.append(m)
                continue
            if pending:
                between = render_after_turn(tokenizer, pending, tokenizer.decode([end]))
                ids, mask, pending = ids + between, mask + [0] * len(between), []
            turn = tokenizer(m["content"], add_special_tokens=False).input_ids + [end]
            ids, mask = ids + turn, mask + [1] * len(turn)
        out.append((ids, mask))
    return out


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T], and the loss mask of trained positions [B, T-1]."""
    T = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), T), dtype=torch.long)
    trained = torch.zeros((len(pairs), T))
    for i, (seq, mask) in enumerate(pairs):
        ids[i, :len(seq)], attention[i, :len(seq)], trained[i, :len(seq)] = torch.tensor(seq), 1, torch.tensor(mask)
    return ids, attention, trained[:, 1:]  # position t+1 is predicted by the logits at t


# How each metric of a step is reduced over processes (reduce_metrics): mean unless named here.
REDUCTIONS = {"perf/step_s": "max", "perf/tokens_per_s": "max"}


def sft(cfg: Config, show_progress: bool = True) -> Path:
    """Fine-tune on worked solutions; returns the run folder (config, metrics, adapter or model)."""
    return run_sft(cfg, show_progress).run_dir


def run_sft(cfg: Config, show_progress: bool = True, inputs: Inputs | None = None) -> Run:
    """Fine-tune on worked solutions; returns the run (folder, and the trained model and tokenizer in memory).

    With several processes (torchrun / accelerate launch, any strategy) each takes its share of every
    step's examples; the mean is over the tokens of all of them, so the step is the one-process step."""
    # ---- setup ----------------------------------------------------------------------------------------
    run = setup_run(cfg, "SFT", inputs)
    cfg = run.cfg  # as resolved at start (the template "auto" made concrete)
    model, tok, dist, device = run.model, run.tokenizer, run.dist, run.device
    pairs = encode_pairs(tok, run.train_prompts, [sft_conversation(ex) or sft_target(ex) for ex in run.train_set])
    opt = prepare_training(run, cfg.max_steps)
    state = LoopState(PromptSampler(len(pairs), cfg.seed))
    monitor = start_loop(run, opt, state, show_progress)  # resume, or evaluate before training

    mb = cfg.per_device_train_batch_size
    # Ctrl-C: finish the step, save a checkpoint, stop; again: stop at once. An error closes the monitor.
    with Interrupt() as interrupt, monitor:
        for step in range(state.step + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            model.train()
            micro = []  # every process draws the step's examples for all and takes its share of each micro-batch
            for _ in range(cfg.gradient_accumulation_steps):
                idx = state.sampler.take(mb * dist.world)[dist.rank * mb:(dist.rank + 1) * mb]
                micro.append(collate([pairs[i] for i in idx], tok.pad_token_id))
            num_tokens = dist.sum([sum(m[2].sum().item() for m in micro)])[0]  # mean over the whole global batch
            loss_sum = 0.0
            for j, (ids, attention, loss_mask) in enumerate(micro):
                ids, attention, loss_mask = ids.to(device), attention.to(device), loss_mask.to(device)
                logits = opt.wrapped(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
                loss = (nll * loss_mask).sum() / num_tokens
                dist.backward(loss * dist.world, last=j == len(micro) - 1)  # the strategy averages over processes
                loss_sum += loss.item() * dist.world  # averaged over processes below: the global mean
            grad_norm, applied = dist.step(opt.optimizer, trainable_parameters(model), cfg.max_grad_norm,
                                           math.isfinite(loss_sum))  # a non-finite loss skips the update
            step_schedule(opt.scheduler)  # skipped updates count too
            metrics = {"train/loss": loss_sum, "train/grad_norm": grad_norm,
                       "train/skipped_updates": float(not applied),
                       "train/learning_rate": opt.scheduler.get_last_lr()[0], "perf/step_s": time.perf_counter() - t0,
                       "perf/tokens_per_s": num_tokens / dist.world / (time.perf_counter() - t0)}
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
                metrics |= run_eval(run)
            monitor.log(step, dist.reduce_metrics(metrics, REDUCTIONS))
            end_step(run, opt, state, monitor, interrupt, step, all_skipped=not applied)

    finish_run(run, monitor, state.before)
    return run
