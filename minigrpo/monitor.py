"""Run folder and monitoring: metrics.jsonl, TensorBoard events, samples.jsonl, a rich progress bar.

The loop calls `log(step, metrics)` and `samples(step, rows)`; nothing else in it knows where numbers go.
Metric names live under fixed prefixes (train/, completions/, perf/, eval/, memory/).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)


def print0(*args: Any) -> None:
    """Print through rich, on process 0 only (RANK is set by torchrun / accelerate launch)."""
    if os.environ.get("RANK", "0") == "0":
        console.print(*args)


def quiet_libraries() -> None:
    """The command line shows minigrpo's own progress only: no third-party progress bars (transformers' "Loading
    weights" / "Writing model shards", GGUF dequantization, the hub's downloads) and no DeepSpeed accelerator notice.

    Public switches only, set before those libraries are imported (explicit settings in the environment are
    kept: HF_HUB_DISABLE_PROGRESS_BARS=0 TQDM_DISABLE=0 bring the bars back, e.g. for a long download).
    DS_ACCELERATOR=cpu names the accelerator DeepSpeed falls back to anyway when torch sees none (after
    logging a warning); accelerate imports DeepSpeed, when installed, to save a model.
    """
    # Before the libraries are imported: tqdm reads its environment defaults when it is imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow the hub's switch
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's default for bars made directly (GGUF dequantization)
    import torch  # here: the command line starts without it, and every command imports it

    if torch.accelerator.current_accelerator() is None:  # no CUDA, MPS, XPU ...: DeepSpeed's fallback is cpu
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM, which starts afresh when a program starts
    (ru_maxrss keeps the peak of the process that launched it: a spawned bench run would read its parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        import resource  # here: Unix only, and the command line imports this module on every platform

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory_gb(device: Any) -> float:
    """The peak that limits a run on `device`: allocated GPU memory on CUDA, else the process's peak RSS; in GB
    (1e9 bytes). The one reading of peak memory: the loop's memory/peak_gb, `bench` and `plan` use it."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch  # here: this module loads before torch on the command line (quiet_libraries)

        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


def make_run_dir(output_dir: str | None) -> Path:
    """The run folder: output_dir, or runs/<date-time> (a suffix is added if it exists)."""
    if output_dir:
        path = Path(output_dir)
    else:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class Monitor:
    """Writes every step's metrics to metrics.jsonl and TensorBoard; shows a progress bar with the headline."""

    def __init__(self, run_dir: Path, total_steps: int, logging_steps: int = 1, show: bool = True,
                 stage: str = "GRPO", enabled: bool = True) -> None:
        self.enabled = enabled  # False on processes other than 0: every method does nothing
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # here: see quiet_libraries (this module loads first)

        self.run_dir = run_dir
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.samples_file = open(run_dir / "samples.jsonl", "a")
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.logging_steps = logging_steps
        self.progress = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                                 console=console, disable=not show)
        self.task = self.progress.add_task("", total=total_steps, stage=stage)
        self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        if "train/reward" in metrics:
            head = (f"reward {metrics['train/reward']:.3f}  acc {metrics['train/accuracy']:.3f}  "
                    f"len {metrics['completions/mean_length']:.0f}  {metrics['perf/step_s']:.2f}s/step")
            self.progress.update(self.task, completed=step, description=head)
            if step % self.logging_steps == 0 and not self.progress.disable:
                self.progress.console.print(f"step {step:>4}  {head}  kl {metrics.get('train/kl', 0.0):.4f}  "
                                            f"zero-std {metrics['train/frac_reward_zero_std']:.2f}")
        elif "train/loss" in metrics:  # supervised stage
            head = f"loss {metrics['train/loss']:.4f}  {metrics['perf/step_s']:.2f}s/step"
            self.progress.update(self.task, completed=step, description=head)
            if step % self.logging_steps == 0 and not self.progress.disable:
                self.progress.console.print(f"step {step:>4}  {head}")
        if "eval/accuracy" in metrics and not self.progress.disable:
            self.progress.console.print(f"step {step:>4}  eval accuracy {metrics['eval/accuracy']:.3f}  "
                                        f"format {metrics['eval/format']:.3f}")

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Record a few completions (prompt, completion, reward, answer) for reading later."""
        if not self.enabled:
            return
        for row in rows:
            self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
        self.samples_file.flush()

    def close(self) -> None:
        """Stop the progress bar and flush every file."""
        if not self.enabled:
            return
        self.progress.stop()
        self.metrics_file.close()
        self.samples_file.close()
        self.tb.close()
