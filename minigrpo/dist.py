"""Several processes on accelerate: `torchrun` / `accelerate launch` run the same loop, on DDP, DeepSpeed or FSDP.

Each process generates and scores its own prompts: a step's prompts are drawn for all processes (the same
draw everywhere) and each takes its share, so a group never splits across processes. Every prompt samples
from its own seed, so a prompt's completions do not depend on which process draws them. The rewards are
gathered (`gather`) so that advantages are computed over the global batch (per group that changes nothing;
`scale_rewards: batch` takes the std of the whole batch), then each process keeps its rows. The loss is
normalised by counts over all processes and every strategy averages gradients over processes, so the
gradient is the one-process gradient of the whole global batch. Process 0 logs and saves; evaluation is
split across processes.

The strategy is accelerate's: `accelerate launch --config_file configs/accelerate/<strategy>.yaml` (or its
ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP variables under torchrun) picks DDP, DeepSpeed ZeRO-2/3
(optionally offloading the optimizer to CPU) or FSDP; `Distributed` is the loops' only contact with it:
prepare, backward, step, whole weights for generation, checkpoint shards, collectives. Metrics are reduced
over processes as the code that makes them declares (`reduce_metrics`: mean unless told max or sum).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from minigrpo.compat import zero3_fetch_hooks_lifted
from minigrpo.errors import ConfigError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1")


def launched_strategy() -> str | None:
    """'deepspeed', 'fsdp' or 'ddp' when launched by torchrun / accelerate launch, None for a plain process.

    DeepSpeed and FSDP are on even with one process (ZeRO-2 with CPU offload on one GPU saves memory)."""
    if "LOCAL_RANK" in os.environ and _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if "LOCAL_RANK" in os.environ and _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


class Distributed:
    """This process's place among the data-parallel processes, and the strategy that trains across them.

    With one plain process every method is trivial: the loop reads the same with or without a strategy."""

    def __init__(self, device: str = "cpu") -> None:
        self.acc, self.strategy, self.prepared = None, launched_strategy(), None
        if self.strategy:
            # here: only a launched run needs accelerate, and it pulls in much at import (start-up time)
            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs

            on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            if self.strategy == "ddp":
                self.acc = Accelerator(cpu=on_cpu)  # CPU processes talk over gloo, GPU ones over NCCL
            else:  # accelerate takes DeepSpeed/FSDP only with cpu=False; on CPU it needs the backend named
                handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
                self.acc = Accelerator(kwargs_handlers=handlers)
                if self.strategy == "fsdp" and self.acc.distributed_type.name != "FSDP":
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
        return self.prepared.zero_optimization_stage() if self.strategy == "deepspeed" and self.prepared else 0

    @property
    def offloads_optimizer(self) -> bool:
        """Whether the DeepSpeed config keeps the optimizer on the CPU (ZeRO-Offload)."""
        if self.strategy != "deepspeed":
            return False
        zero = self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"

    @property
    def saves_shards(self) -> bool:
        """Whether checkpoints hold the strategy's own shards (DeepSpeed, FSDP: weights and optimizer per process)."""
        return self.strategy in ("deepspeed", "fsdp")

    @property
    def sharded(self) -> bool:
        """Whether the weights themselves are split over processes (ZeRO-3, FSDP): not readable as they are."""
        return self.strategy == "fsdp" or self.zero_stage == 3

    # ---- the strategy ---------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
                max_grad_norm: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """(model for the loss pass, optimizer): DDP wraps the model only; DeepSpeed and FSDP take both.

        The learning-rate schedule stays the loop's (it sets the lr of the optimizer's param groups)."""
        if not self.acc:
            self.prepared = model
            return model, optimizer
        if self.strategy == "ddp":
            self.prepared = self.acc.prepare_model(model)
            return self.prepared, optimizer
        if self.strategy == "deepspeed":
            # The loop accumulates its own micro-batches (`backward(last=...)`): DeepSpeed sees one per step.
            # Clipping is DeepSpeed's (its step skips non-finite gradients, like the loop's).
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
        if self.strategy == "deepspeed":
            self.prepared.set_gradient_accumulation_boundary(last)
            self.prepared.backward(loss)
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_grad_norm: float | None, loss_finite: bool = True) -> tuple[float, bool]:
        """Clip, then update unless the gradient or (on any process) the loss is not finite; (gradient norm,
        whether the update happened)."""
        if self.strategy == "deepspeed":  # DeepSpeed clips, steps (or skips a non-finite step) and zeroes
            self.prepared.step()
            norm = self.prepared.get_global_grad_norm()
            return float(norm if norm is not None else float("nan")), bool(self.prepared.was_step_applied())
        clip = self.acc.clip_grad_norm_ if self.strategy == "fsdp" else torch.nn.utils.clip_grad_norm_
        norm = clip(params, max_grad_norm or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        applied = math.isfinite(norm) and (self.max(0.0 if loss_finite else 1.0) == 0.0 if self.world > 1
                                           else loss_finite)
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside, `model` holds its whole weights on every process, for generation at each process's pace.

        ZeRO-3 gathers the partitions and lifts DeepSpeed's per-module fetch hooks (as TRL does); FSDP2
        unshards every module and keeps them unsharded between forwards. Other strategies: nothing to do."""
        if self.strategy == "deepspeed" and self.zero_stage == 3:
            import deepspeed  # optional dependency (the deepspeed extra)

            with deepspeed.zero.GatheredParameters(list(self.prepared.parameters())), \
                    zero3_fetch_hooks_lifted(self.prepared):
                yield
        elif self.strategy == "fsdp":
            with fsdp2_unsharded(model):
                yield
        else:
            yield

    def policy_state(self) -> dict[str, torch.Tensor] | None:
        """The whole policy's state dict when the weights are split over processes (every process must call
        it; process 0 gets it), else None: the model's own weights are complete."""
        return self.acc.get_state_dict(self.prepared) if self.sharded else None

    def save_shards(self, path: Path) -> None:
        """DeepSpeed / FSDP: every process writes its shards of the weights and optimizer into `path`."""
        if self.saves_shards:
            kwargs = {"exclude_frozen_parameters": True} if self.strategy == "deepspeed" else {}
            self.acc.save_state(str(path), **kwargs)

    def load_shards(self, path: Path) -> None:
        if self.saves_shards:
            kwargs = {"load_module_strict": False} if self.strategy == "deepspeed" else {}
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

    def gather_uneven(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D tensor, whatever its length, concatenated in process order."""
        if not self.acc:
            return t
        sizes = self.gather(torch.tensor([t.numel()], device=t.device))
        padded = torch.zeros(int(sizes.max()), dtype=t.dtype, device=t.device)
        padded[:t.numel()] = t
        everyone = self.gather(padded).view(len(sizes), -1)
        return torch.cat([row[:int(n)] for row, n in zip(everyone, sizes)])

    def reduce_metrics(self, metrics: dict[str, float], reductions: dict[str, str] | None = None,
                       ) -> dict[str, float]:
        """Each metric over processes: the mean (each process had the same number of completions), or what
        `reductions` names for it ("max": a peak or a longest; "min": a smallest; "sum": a count)."""
        reductions = reductions or {}
        unknown = set(reductions.values()) - {"mean", "max", "min", "sum"}
        if unknown:
            raise ValueError(f"reduce_metrics: unknown reductions {sorted(unknown)}; use mean, max, min or sum")
        if not self.acc:
            return metrics
        keys = sorted(metrics)
        totals = self.sum([metrics[k] for k in keys])
        out = {k: v / self.world if reductions.get(k, "mean") == "mean" else v for k, v in zip(keys, totals)}
        for how, op in (("max", torch.distributed.ReduceOp.MAX), ("min", torch.distributed.ReduceOp.MIN)):
            picked = [k for k in keys if reductions.get(k) == how]
            if picked:
                t = torch.tensor([metrics[k] for k in picked], dtype=torch.float64, device=self.acc.device)
                torch.distributed.all_reduce(t, op=op)
                out |= dict(zip(picked, t.tolist()))
        return out

    def share(self, items: list[Any]) -> list[Any]:
        """This process's contiguous share of a list (for evaluation)."""
        n = len(items)
        return items[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def broadcast(self, obj: Any) -> Any:
        """Process 0's object, on every process."""
        if not self.acc:
            return obj
        from accelerate.utils import broadcast_object_list  # here: see __init__

        return broadcast_object_list([obj])[0]

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()


@contextlib.contextmanager
def fsdp2_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Every FSDP2 module of `model` unsharded, and kept so across forwards, while inside."""
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
