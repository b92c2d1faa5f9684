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

from minigrpo.config import Config, ConfigError
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
    """Fine-tune on worked solutions; returns the run folder (config, metrics, adapter or model)."""
    # ---- setup ----------------------------------------------------------------------------------------
    run = setup_run(cfg)
    if run.ranks.world > 1:
        raise ConfigError("sft runs in one process for now; launch it without torchrun / accelerate launch")
    model, tok = run.model, run.tokenizer
    device = next(model.parameters()).device
    pairs = encode_pairs(tok, run.train_prompts, [sft_target(ex) for ex in run.train_set])
    optimizer, scheduler = make_optimizer(cfg, model, cfg.max_steps)
    sampler = PromptSampler(len(pairs), cfg.seed)
    monitor = Monitor(run.run_dir, cfg.max_steps, cfg.logging_steps, show=show_progress, stage="SFT")
    before = run_eval(cfg, model, tok, run.eval_prompts, run.eval_set)
    if before:
        monitor.log(0, before)

    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        model.train()
        micro = [collate([pairs[i] for i in sampler.take(cfg.per_device_train_batch_size)], tok.pad_token_id)
                 for _ in range(cfg.gradient_accumulation_steps)]
        num_tokens = sum(m[2].sum().item() for m in micro)  # mean over the whole accumulated batch
        loss_sum = 0.0
        for ids, attention, loss_mask in micro:
            ids, attention, loss_mask = ids.to(device), attention.to(device), loss_mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
            loss = (nll * loss_mask).sum() / num_tokens
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"train/loss": loss_sum, "train/grad_norm": grad_norm.item(),
                   "train/learning_rate": scheduler.get_last_lr()[0], "perf/step_s": time.perf_counter() - t0,
                   "perf/tokens_per_s": num_tokens / (time.perf_counter() - t0)}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            metrics |= run_eval(cfg, model, tok, run.eval_prompts, run.eval_set)
        monitor.log(step, metrics)

    return finish_run(cfg, run, monitor, before)
