"""Several processes on accelerate: `torchrun` / `accelerate launch` run the same loop, on DDP, DeepSpeed or FSDP.

Each process generates and scores its own prompts: a step's prompts are drawn for all processes (the same
draw everywhere) and each takes its share, so a group never splits across processes and advantages stay
per group, with no gathering of rewards. Every prompt samples from its own seed, so a prompt's
completions do not depend on which process draws them. The loss is normalised by counts over all
processes and every engine averages gradients over processes, so the gradient is the one-process
gradient of the whole global batch. Process 0 logs and saves; evaluation is split across processes.

The engine is accelerate's: `accelerate launch --config_file configs/accelerate/<engine>.yaml` (or its
ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP variables under torchrun) picks DDP, DeepSpeed ZeRO-2/3
(optionally offloading the optimizer to CPU) or FSDP; `Ranks` is the loop's only contact with it: prepare,
backward, step, full weights for generation, checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minigrpo.compat import zero3_fetch_hooks_lifted
from minigrpo.config import ConfigError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1")


def launched_engine() -> str | None:
    """'deepspeed', 'fsdp' or 'ddp' when launched by torchrun / accelerate launch, None for a plain process.

    DeepSpeed and FSDP are on even with one process (ZeRO-2 with CPU offload on one GPU saves memory)."""
    if "LOCAL_RANK" in os.environ and _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if "LOCAL_RANK" in os.environ and _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


class Ranks:
    """This process's place among the data-parallel processes, and the engine that trains across them.

    With one plain process every method is trivial: the loop reads the same with or without an engine."""

    def __init__(self, device: str = "cpu") -> None:
        self.acc, self.engine, self.prepared = None, launched_engine(), None
        if self.engine:
            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs

            on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            if self.engine == "ddp":
                self.acc = Accelerator(cpu=on_cpu)  # CPU processes talk over gloo, GPU ones over NCCL
            else:  # accelerate takes DeepSpeed/FSDP only with cpu=False; on CPU it needs the backend named
                handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
                self.acc = Accelerator(kwargs_handlers=handlers)
                if self.engine == "fsdp" and self.acc.distributed_type.name != "FSDP":
                    raise ConfigError("FSDP: accelerate runs FSDP on GPUs only and found none; on CPU use DeepSpeed "
                                      "(configs/accelerate/zero2.yaml or zero3.yaml) or DDP (torchrun)")

    @property
    def world(self) -> int:
        return self.acc.num_processes if self.acc else 1

    @property
    def rank(self) -> int:
        return self.acc.process_index if self.acc else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.acc.device if self.acc else None

    @property
    def zero_stage(self) -> int:
        """DeepSpeed's ZeRO stage (0 when not on DeepSpeed)."""
        return self.prepared.zero_optimization_stage() if self.engine == "deepspeed" and self.prepared else 0

    @property
    def offloads_optimizer(self) -> bool:
        """Whether the DeepSpeed config keeps the optimizer on the CPU (ZeRO-Offload)."""
        if self.engine != "deepspeed":
            return False
        zero = self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"

    @property
    def engine_state(self) -> bool:
        """Whether checkpoints hold the engine's own state (DeepSpeed, FSDP: optimizer shards per process)."""
        return self.engine in ("deepspeed", "fsdp")

    @property
    def sharded(self) -> bool:
        """Whether the weights themselves are split over processes (ZeRO-3, FSDP): not readable as they are."""
        return self.engine == "fsdp" or self.zero_stage == 3

    # ---- the engine ---------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
                max_grad_norm: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """(model for the loss pass, optimizer): DDP wraps the model only; DeepSpeed and FSDP take both.

        The learning-rate schedule stays the loop's (it sets the lr of the optimizer's param groups)."""
        if not self.acc:
            self.prepared = model
            return model, optimizer
        if self.engine == "ddp":
            self.prepared = self.acc.prepare_model(model)
            return self.prepared, optimizer
        if self.engine == "deepspeed":
            # The loop accumulates its own micro-batches (`backward(last=...)`): DeepSpeed sees one per step.
            # Clipping is the engine's (its step skips non-finite gradients, like the loop's).
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                      train_batch_size=micro_batch * self.world, gradient_clipping=max_grad_norm or 0.0)
            zero = ds.setdefault("zero_optimization", {})
            zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
            # DeepSpeed's default reduce bucket (5e8 elements) is 1-2 GB, more than a small model: 5e7 (100-200
            # MB; hidden_size^2, HF's "auto", makes hundreds of tiny reductions on small models). ZeRO-3's
            # prefetch and persistence follow the model (accelerate fills "auto" from hidden_size).
            zero.setdefault("reduce_bucket_size", int(5e7))
            for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
                zero.setdefault(key, "auto")
        self.prepared, optimizer = self.acc.prepare(model, optimizer)
        return self.prepared, optimizer

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Gradients of one micro-batch; `last`: the step's last one (DeepSpeed reduces there)."""
        if self.engine == "deepspeed":
            self.prepared.set_gradient_accumulation_boundary(last)
            self.prepared.backward(loss)
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_grad_norm: float | None) -> tuple[float, bool]:
        """Clip, then update unless the gradient is not finite; (gradient norm, whether the update happened)."""
        if self.engine == "deepspeed":  # the engine clips, steps (or skips a non-finite step) and zeroes
            self.prepared.step()
            norm = self.prepared.get_global_grad_norm()
            return float(norm if norm is not None else float("nan")), bool(self.prepared.was_step_applied())
        clip = self.acc.clip_grad_norm_ if self.engine == "fsdp" else torch.nn.utils.clip_grad_norm_
        norm = clip(params, max_grad_norm or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        applied = math.isfinite(norm)
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside, `model` holds its whole weights on every process, for generation at each process's pace.

        ZeRO-3 gathers the partitions and lifts DeepSpeed's per-module fetch hooks (as TRL does); FSDP2
        unshards every module and keeps them unsharded between forwards. Other engines: nothing to do."""
        if self.engine == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.prepared.parameters())), \
                    zero3_fetch_hooks_lifted(self.prepared):
                yield
        elif self.engine == "fsdp":
            with fsdp2_unsharded(model):
                yield
        else:
            yield

    def policy_state(self) -> dict[str, torch.Tensor] | None:
        """The whole policy's state dict when the weights are split over processes (every process must call
        it; process 0 gets it), else None: the model's own weights are complete."""
        return self.acc.get_state_dict(self.prepared) if self.sharded else None

    def save_engine(self, path: Path) -> None:
        """DeepSpeed / FSDP: every process writes its shards of the weights and optimizer into `path`."""
        if self.engine_state:
            kwargs = {"exclude_frozen_parameters": True} if self.engine == "deepspeed" else {}
            self.acc.save_state(str(path), **kwargs)

    def load_engine(self, path: Path) -> None:
        if self.engine_state:
            kwargs = {"load_module_strict": False} if self.engine == "deepspeed" else {}
            self.acc.load_state(str(path), **kwargs)

    # ---- collectives --------------------------------------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes."""
        if not self.acc:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, "sum").tolist()

    def max(self, value: float) -> float:
        """The largest value over processes."""
        if not self.acc:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's tensor (same shape everywhere), concatenated in process order along dim 0."""
        if not self.acc:
            return t
        return self.acc.gather(t.to(self.acc.device)).to(t.device)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every metric averaged over processes (each had the same number of completions); maxima stay maxima."""
        if not self.acc:
            return metrics
        keys = sorted(metrics)
        means = self.sum([metrics[k] for k in keys])
        out = {k: v / self.world for k, v in zip(keys, means)}
        maxed = [k for k in keys if k.endswith("max_length") or k.startswith(("perf/", "memory/"))]
        if maxed:
            t = torch.tensor([metrics[k] for k in maxed], dtype=torch.float64, device=self.acc.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            out |= dict(zip(maxed, t.tolist()))
        for k in ("train/skipped_samples", "train/reward_errors"):
            if k in out:
                out[k] *= self.world  # counts add up
        return out

    def share(self, items: list[Any]) -> list[Any]:
        """This process's contiguous share of a list (for evaluation)."""
        n = len(items)
        return items[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def broadcast(self, obj: Any) -> Any:
        """Process 0's object, on every process."""
        if not self.acc:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()


@contextlib.contextmanager
def fsdp2_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Every FSDP2 module of `model` unsharded, and kept so across forwards, while inside."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
