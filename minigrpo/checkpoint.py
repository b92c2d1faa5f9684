"""Checkpoints that survive a crash at any moment, and exact resume.

`checkpoint-N/` holds the policy as `save_pretrained` writes it (adapter or model, with the tokenizer, so
`minigrpo export` and peft/transformers read it as is) and `trainer_state.pt`: optimizer, scheduler, the
RNG states (python, numpy, torch, CUDA), the data order and position, the step and the loop's counters.
Under DeepSpeed or FSDP, `shards/` holds what accelerate's `save_state` writes: each process's shards of the
weights and the optimizer.
It is written to a temporary folder, flushed to disk and renamed into place: a folder named `checkpoint-N`
is always complete, and a kill mid-write leaves only a `.tmp` folder, ignored and cleaned up later.
`checksums.sha256` (the format of `sha256sum -c`) lists every file's digest: a checkpoint damaged later (a disk
error, a copy cut short) is found at resume, set aside, and the previous one is used (run.resume).
The final policy (RUN/model or RUN/adapter) is written the same way: complete, or the previous one.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

STATE = "trainer_state.pt"
CHECKSUMS = "checksums.sha256"
SHARDS_DIR = "shards"  # DeepSpeed / FSDP shards, as accelerate's save_state writes them
PENDING = "pending-{rank}.pt"  # overlapped rollouts: a process's batches sampled ahead (run.py)


def shards_dir(checkpoint: Path) -> Path:
    """Where a checkpoint keeps the strategy's shards (`engine/` in checkpoints of minigrpo before 2026-11-29)."""
    legacy = Path(checkpoint) / "engine"
    return legacy if legacy.is_dir() else Path(checkpoint) / SHARDS_DIR


def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    """checksums.sha256 in `folder`: one `<sha256>  <relative path>` line per file (`sha256sum -c` reads it)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    (folder / CHECKSUMS).write_text("".join(f"{_digest(p)}  {p.relative_to(folder).as_posix()}\n" for p in files))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file `checksums.sha256` lists is there with its digest (a checkpoint written before
    checksums existed is trusted); else what is wrong, for the message."""
    listed = Path(folder) / CHECKSUMS
    if not listed.is_file():
        return None if (Path(folder) / STATE).is_file() else f"{STATE} is missing"
    for line in listed.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if _digest(path) != digest:
            return f"{name} does not match its checksum"
    return None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if step.isdigit() and (p / STATE).is_file():
            found.append((int(step), p))
    return sorted(found)


def save_policy(model: torch.nn.Module, tokenizer: Any, path: Path,
                weights: dict[str, torch.Tensor] | None = None) -> None:
    """Save the adapter (LoRA) or the full model, with the tokenizer, loadable by peft / transformers.

    weights: the model's whole state dict when its own parameters are shards (ZeRO-3, FSDP)."""
    kwargs: dict[str, Any] = {} if weights is None else {"state_dict": weights}
    if hasattr(model, "peft_config"):
        # minigrpo never resizes the vocabulary, so the base's embeddings never belong in the adapter; peft's
        # "auto" would look the base model's config up (on the hub for a hub id) at every save to decide.
        kwargs["save_embedding_layers"] = False
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)


def start_checkpoint(run_dir: Path, step: int) -> Path:
    """The empty temporary folder checkpoint-{step} is written in (DeepSpeed / FSDP write their shards there too)."""
    tmp = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any],
                    keep: int = 0, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Complete checkpoint-{step} atomically (policy + trainer state into the folder `start_checkpoint` made,
    which may already hold the strategy's shards, then renamed); keep the newest `keep` (0: all)."""
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.tmp"
    save_policy(model, tokenizer, tmp, weights)
    torch.save(state | {"step": step, "rng": rng_state()}, tmp / STATE)
    write_checksums(tmp)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_tree(run_dir)
    complete = checkpoints(run_dir)
    for _, old in complete[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(".checkpoint-*.tmp"):  # left by a kill during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_final_policy(model: torch.nn.Module, tokenizer: Any, path: Path,
                      weights: dict[str, torch.Tensor] | None = None) -> None:
    """The trained policy into `path` (RUN/model or RUN/adapter) atomically: written beside it, then swapped in;
    a kill leaves the previous one (or none), never half of one."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(model, tokenizer, tmp, weights)
    _fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_tree(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_policy_weights(model: torch.nn.Module, path: Path) -> None:
    """Put the weights saved in `path` (adapter or full model) into `model`, exactly."""
    if (path / "adapter_config.json").is_file():
        result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{path}: adapter weights that this model does not have: {unexpected[:3]}")
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no adapter_model.safetensors or *.safetensors weights")
    loaded: set[str] = set()
    for f in files:
        weights = load_file(f)
        model.load_state_dict(weights, strict=False)
        loaded |= set(weights)
    names = {n for n, _ in model.named_parameters()}  # tied weights appear once
    missing = names - loaded
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {sorted(missing)[:3]}")


def load_checkpoint(path: Path, model: torch.nn.Module | None) -> dict[str, Any]:
    """Policy weights into `model` (None: the strategy loads its own shards); returns the trainer state (RNG
    states restored by the caller, last)."""
    if model is not None:
        load_policy_weights(model, path)
    return torch.load(path / STATE, weights_only=False)
