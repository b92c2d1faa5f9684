"""Several processes (data parallel) on accelerate: `torchrun` / `accelerate launch` run the same loop.

Each process generates and scores its own prompts: a step's prompts are drawn for all processes (the same
draw everywhere) and each takes its share, so a group never splits across processes and advantages stay
per group, with no gathering of rewards. Every prompt samples from its own seed, so a prompt's
completions do not depend on which process draws them. The loss is normalised by counts over all
processes and the model is wrapped in DDP (through accelerate), so the gradient is the one-process
gradient of the whole global batch. Process 0 logs and saves; evaluation is split across processes.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def launched_world() -> int:
    """Processes in this launch (WORLD_SIZE from torchrun / accelerate launch), 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Ranks:
    """This process's place among the data-parallel processes; with one process every method is trivial."""

    def __init__(self, device: str = "cpu") -> None:
        self.acc = None
        if launched_world() > 1:
            from accelerate import Accelerator

            on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            self.acc = Accelerator(cpu=on_cpu)  # CPU processes talk over gloo, GPU ones over NCCL

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

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model for the loss pass: DDP through accelerate, or the model itself."""
        return self.acc.prepare_model(model) if self.acc else model

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes."""
        if not self.acc:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, "sum").tolist()

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
