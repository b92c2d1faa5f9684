"""Supervised fine-tuning: the cold-start stage of the R1 recipe (and the SFT after rejection sampling).

Same config, run folder, logging and evaluation as `train`. The data is any dataset `train` reads: the
target of each problem is its worked solution reformatted to end in `#### N` (`data.sft_target`), so
GSM8K solutions, the arith task's solutions and rejection-sampled JSONL (`minigrpo sample`) all work.
The loss is the mean cross-entropy of the target tokens (EOS included), prompt tokens masked out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minigrpo.config import Config
from minigrpo.data import sft_target
from minigrpo.model import trainable_parameters
from minigrpo.monitor import Monitor
from minigrpo.train import PromptSampler, finish_run, make_optimizer, run_eval, setup_run


def encode_pairs(tokenizer: Any, prompts: list[str], targets: list[str]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + target + EOS, and the prompt length (where the loss starts)."""
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    t_ids = tokenizer(targets, add_special_tokens=False).input_ids
    return [(p + t + [tokenizer.eos_token_id], len(p)) for p, t in zip(p_ids, t_ids)]


def collate(pairs: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T], and the loss mask of target positions [B, T-1]."""
    T = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), T), dtype=torch.long)
    for i, (seq, _) in enumerate(pairs):
        ids[i, :len(seq)], attention[i, :len(seq)] = torch.tensor(seq), 1
    positions = torch.arange(1, T)[None, :]  # position t+1 is predicted by logits at t
    starts = torch.tensor([start for _, start in pairs])[:, None]
    loss_mask = (positions >= starts) & attention[:, 1:].bool()
    return ids, attention, loss_mask.float()


def sft(cfg: Config, show_progress: bool = True) -> Path:
    """Fine-tune on worked solutions; returns the run folder (config, metrics, adapter or model).

    With several processes (torchrun / accelerate launch, any engine) each takes its share of every
    step's examples; the mean is over the tokens of all of them, so the step is the one-process step."""
    # ---- setup ----------------------------------------------------------------------------------------
    run = setup_run(cfg)
    model, tok, ranks = run.model, run.tokenizer, run.ranks
    device = next(model.parameters()).device
    pairs = encode_pairs(tok, run.train_prompts, [sft_target(ex) for ex in run.train_set])
    optimizer, scheduler = make_optimizer(cfg, model, cfg.max_steps, ranks.offloads_optimizer)
    wrapped, optimizer = ranks.prepare(model, optimizer, cfg.per_device_train_batch_size, cfg.max_grad_norm)
    sampler = PromptSampler(len(pairs), cfg.seed)
    monitor = Monitor(run.run_dir, cfg.max_steps, cfg.logging_steps, show=show_progress, stage="SFT",
                      enabled=ranks.main)
    before = run_eval(cfg, model, tok, run.eval_prompts, run.eval_set, ranks)
    if before:
        monitor.log(0, before)

    mb = cfg.per_device_train_batch_size
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        model.train()
        micro = []  # every process draws the step's examples for all and takes its share of each micro-batch
        for _ in range(cfg.gradient_accumulation_steps):
            idx = sampler.take(mb * ranks.world)[ranks.rank * mb:(ranks.rank + 1) * mb]
            micro.append(collate([pairs[i] for i in idx], tok.pad_token_id))
        num_tokens = ranks.sum([sum(m[2].sum().item() for m in micro)])[0]  # mean over the whole global batch
        loss_sum = 0.0
        for j, (ids, attention, loss_mask) in enumerate(micro):
            ids, attention, loss_mask = ids.to(device), attention.to(device), loss_mask.to(device)
            logits = wrapped(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
            loss = (nll * loss_mask).sum() / num_tokens
            ranks.backward(loss * ranks.world, last=j == len(micro) - 1)  # the engine averages over processes
            loss_sum += loss.item() * ranks.world  # averaged over processes below: the global mean
        grad_norm, _ = ranks.step(optimizer, trainable_parameters(model), cfg.max_grad_norm)
        scheduler.step()
        metrics = {"train/loss": loss_sum, "train/grad_norm": grad_norm,
                   "train/learning_rate": scheduler.get_last_lr()[0], "perf/step_s": time.perf_counter() - t0,
                   "perf/tokens_per_s": num_tokens / ranks.world / (time.perf_counter() - t0)}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            metrics |= run_eval(cfg, model, tok, run.eval_prompts, run.eval_set, ranks)
        monitor.log(step, ranks.mean_metrics(metrics))

    return finish_run(cfg, run, monitor, before)
