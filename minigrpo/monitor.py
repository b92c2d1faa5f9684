"""Run folder and monitoring: metrics.jsonl, samples.jsonl, a rich progress bar, and the `report_to` backends.

The loop calls `log(step, metrics)` and `samples(step, rows)`; nothing else in it knows where numbers go.
Metric names live under fixed prefixes (train/, completions/, perf/, eval/, memory/); every backend gets the
same names, and wandb / trackio also get the sampled completions as a table named "completions".

`report_to` (REPORTERS) picks the backends besides metrics.jsonl; each is imported only when asked for, and
reads its own environment variables:
  tensorboard  event files in <run>/tensorboard (`tensorboard --logdir runs`)
  wandb        WANDB_PROJECT (default minigrpo), WANDB_ENTITY, WANDB_API_KEY; WANDB_MODE=offline keeps the run
               on disk in <run>/wandb, or WANDB_DIR (`wandb sync` uploads it later). Quiet unless WANDB_SILENT=false.
  trackio      local by default: a SQLite file in TRACKIO_DIR (default ~/.cache/huggingface/trackio), shown by
               `trackio show`; TRACKIO_PROJECT (default minigrpo)
  mlflow       MLFLOW_TRACKING_URI (default: mlflow's local store in the working directory),
               MLFLOW_EXPERIMENT_NAME; the config as parameters
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from minigrpo.errors import ConfigError, DiskError

console = Console(highlight=False)

# report_to's names (config.py checks the key against these; 'none' or [] leaves metrics.jsonl alone).
REPORTERS = {"tensorboard": "TensorBoard event files in the run folder",
             "wandb": "Weights & Biases (WANDB_MODE=offline: a local run in the run folder)",
             "trackio": "Trackio, local by default (TRACKIO_DIR; `trackio show`)",
             "mlflow": "MLflow (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME)"}


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
    """The peak that limits a run on `device`: allocated GPU memory on CUDA, else the process's peak RSS; in GiB
    (2**30 bytes, the unit `minigrpo plan` prints and GPU memory is sold in). The one reading of peak memory: the
    loop's memory/peak_gb, `bench` and `plan` use it."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch  # here: this module loads before torch on the command line (quiet_libraries)

        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def make_run_dir(output_dir: str | None) -> Path:
    """The run folder: output_dir, or runs/<date-time> (a suffix is added if it exists). An output_dir that is a
    file, or cannot be made, is a ConfigError naming the key and the path."""
    if output_dir:
        path = Path(output_dir)
    else:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {path} is a file; give a folder (new or holding a run to resume)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot make {path}: {e.strerror or e}; give a folder you can write") from None
    return path


# What makes a folder hold a run (a new run into it would mix with it): progress that a run wrote. A folder with
# only a config.yaml (a start that failed before its first evaluation or step) holds none, and may be reused.
RUN_PROGRESS = ("checkpoint-*", "model", "adapter", "summary.json")
LOCK_FILE = ".lock"
_HELD: dict[str, Any] = {}  # run folder (resolved) -> the open lock file this process holds on it


def run_progress(path: Path) -> list[str]:
    """The names in `path` that show a run made progress there (empty: no run to mix with)."""
    found = sorted({p.name for pattern in RUN_PROGRESS for p in path.glob(pattern)})
    metrics = path / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def lock_run_dir(path: Path) -> None:
    """Hold `path`'s lock until `release_run_dir` or the end of this process: another process asking for it gets a
    ConfigError at once, naming the holder. An advisory lock of the OS (flock), so a killed run never leaves a
    stale one behind; a run of this same process that ended without releasing it (an error) is taken over."""
    import fcntl  # here: POSIX only, and only a run folder needs it

    key = str(path.resolve())
    release_run_dir(path)  # a run of this process that ended without releasing (its lock is not another run's)
    try:
        f = open(path / LOCK_FILE, "a+")
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write in {path}: {e.strerror or e}; give a folder you can write") \
            from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"output_dir: {path} is in use by a run that is still going ({holder}); wait for it to "
                          f"end, or give another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[key] = f


def release_run_dir(path: Path) -> None:
    """Let go of `path`'s lock, if this process holds it."""
    f = _HELD.pop(str(Path(path).resolve()), None)
    if f is not None:
        f.close()  # closing the file releases the lock


def claim_run_dir(output_dir: str | None, resume: bool, overwrite: bool) -> Path:
    """The run folder, locked for this run (see lock_run_dir). A new run (resume off) into a folder that holds
    another run's progress is refused unless `overwrite` (set_aside_run then moves that run, once the new run's
    input is known to be good); `resume` needs a run there (its config.yaml) to continue."""
    if resume and output_dir and not (Path(output_dir) / "config.yaml").is_file():
        raise ConfigError(f"resume: {output_dir} holds no run to continue (no config.yaml there); give the folder of "
                          f"a run, or start a new one (resume: false)")
    path = make_run_dir(output_dir)
    lock_run_dir(path)
    found = run_progress(path)
    if found and not resume and not overwrite:
        release_run_dir(path)
        raise ConfigError(f"output_dir: {path} already holds a run ({', '.join(found[:4])}); continue it with "
                          f"`minigrpo train --resume {path}` (resume: true), start afresh there with "
                          f"overwrite_output_dir: true (its files are kept in {path}/replaced-<time>/), or "
                          f"give another output_dir")
    return path


# What a run writes in its folder: what overwrite_output_dir moves aside (anything else there stays).
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "curves.png", "checkpoint-*",
             ".checkpoint-*.tmp", "model", "adapter", ".model.*", ".adapter.*", "tensorboard", "wandb",
             "eval_*.json", ".summary.json.tmp", ".metrics.jsonl.tmp", ".samples.jsonl.tmp")


def set_aside_run(path: Path) -> None:
    """overwrite_output_dir: the files of the run in `path` (RUN_FILES) move into replaced-<date-time>/ there;
    nothing is deleted, and files that are not a run's stay where they are."""
    entries = sorted({p for pattern in RUN_FILES for p in path.glob(pattern)})
    if not run_progress(path) or not entries:
        return
    keep = path / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    keep.mkdir()
    for entry in entries:
        entry.rename(keep / entry.name)
    print0(f"overwrite_output_dir: the run that was in {path} is now in {keep}")


# The errors of a full or unwritable disk, however a library reports them (torch: "file write failed"; safetensors:
# "StorageFull"); named as such, with the path, instead of a library's own words.
DISK_FULL = ("No space left", "StorageFull", "file write failed", "Disk quota exceeded")


@contextlib.contextmanager
def disk_errors(path: Path, after: str) -> Any:
    """Inside, a full disk, a read-only or unwritable folder raises DiskError naming `path` and the cause; `after`
    says what is still safe (e.g. the previous checkpoint) and how to go on."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(m in str(e) for m in DISK_FULL)
        denied = getattr(e, "errno", None) in (errno.EACCES, errno.EROFS, errno.EPERM)
        if not (full or denied):
            raise
        probe = Path(path).absolute()
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 1e9
        cause = f"the disk is full ({free:.2f} GB free)" if full else f"it cannot be written ({e.strerror or e})"
        raise DiskError(f"writing {path}: {cause}. {after}") from e


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL log (metrics.jsonl, samples.jsonl). A line that is not a whole JSON object (the torn last
    line of a run killed mid-write) is left out, and said once on stderr: a crash never makes its own log unreadable."""
    rows, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn += 1
    if torn:
        print(f"{path}: left out {torn} line(s) that are not whole JSON rows (a run killed while writing)",
              file=sys.stderr)
    return rows


def report_backends(names: list[str]) -> list[str]:
    """The backends `report_to` names, in order, without repeats ('none' and [] give none); ConfigError naming the
    key and the choices for an unknown name, or for 'none' beside others."""
    for name in names:
        if name not in REPORTERS and name != "none":
            raise ConfigError(f"report_to: got {name!r}, expected entries from {[*REPORTERS, 'none']}")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"report_to: 'none' means metrics.jsonl only; it cannot stand beside others, got {names}")
    return [name for name in dict.fromkeys(names) if name != "none"]


def check_report_to(names: list[str]) -> None:
    """ConfigError when a backend `report_to` names is not installed: called before the run folder is made, so a
    missing package costs no model loading (the packages are only looked up here, not imported)."""
    for name in report_backends(names):
        if importlib.util.find_spec(name) is None:  # each backend's package has the backend's name
            raise ConfigError(f"report_to: {name} is not installed: pip install {name}")


class _TensorBoard:
    """Event files in <run>/tensorboard; no tables (samples.jsonl has the completions)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # here: see quiet_libraries (this module loads first)

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A wandb run named after the run folder, its files in <run>/wandb (or WANDB_DIR); the completions as a
    wandb.Table."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # wandb's own switch for its banner; an explicit value wins
        import wandb  # here: heavy, and only for runs that ask for it

        self.wandb = wandb
        # dir= would override the user's WANDB_DIR: the run folder only when none is set
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minigrpo"), name=run_name,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        # allow_mixed_types: a custom reward may give None for one row and a float for the next
        self.run.log({"completions": self.wandb.Table(columns=columns, data=data, allow_mixed_types=True)}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run named after the run folder, in project TRACKIO_PROJECT (default minigrpo)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None) -> None:
        import trackio  # here: heavy, and only for runs that ask for it

        self.trackio = trackio
        with contextlib.redirect_stdout(io.StringIO()):  # trackio print()s a banner and has no switch for it
            self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "minigrpo"), name=run_name,
                                    config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        self.run.log({"completions": self.trackio.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        # trackio.finish(), not run.finish(): it also forgets the run, which trackio would otherwise finish again
        # (and announce) when Python exits. It prints "Run finished. Uploading logs ..." even when local.
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()


class _MLflow:
    """An MLflow run named after the run folder, with the config as parameters; no tables."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None) -> None:
        import mlflow  # here: heavy, and only for runs that ask for it

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        # Parameters are strings, at most 500 characters in older mlflow (6000 in newer): a long system_prompt
        # would be refused whole. Metric names may hold '/', so train/reward keeps its name.
        mlflow.log_params({key: str(value)[:500] for key, value in (config or {}).items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # mlflow's names allow letters, digits, _ - . / and spaces: train/rewards/<lambda>/mean -> _lambda_
        self.mlflow.log_metrics({re.sub(r"[^\w./\- ]", "_", k): v for k, v in metrics.items()}, step=step)

    def table(self, step: int, columns: list[str], data: list[list[Any]]) -> None:
        pass

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _MLflow}  # REPORTERS' names


class Monitor:
    """Writes every step's metrics to metrics.jsonl and the `report_to` backends; shows a progress bar with the
    headline. `config` (the run's config as a dict) and `run_name` (default: the run folder's name) go to the
    backends that keep them (wandb, trackio, mlflow)."""

    def __init__(self, run_dir: Path, total_steps: int, logging_steps: int = 1, show: bool = True,
                 stage: str = "GRPO", enabled: bool = True, report_to: list[str] | None = None,
                 config: dict[str, Any] | None = None, run_name: str | None = None,
                 callbacks: list[Any] | None = None) -> None:
        self.enabled = enabled  # False on processes other than 0: every method does nothing
        if not enabled:
            return
        self.callbacks = list(callbacks or [])  # the Python API's: on_log, on_evaluate, on_save (api.Callback)
        names = report_backends(["tensorboard"] if report_to is None else report_to)
        check_report_to(names)
        self.backends = [BACKENDS[name](run_dir, run_name or run_dir.name, config) for name in names]
        self.run_dir = run_dir
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.samples_file = open(run_dir / "samples.jsonl", "a")
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
        with disk_errors(self.run_dir / "metrics.jsonl", "The last checkpoint is intact; free space and resume"):
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
        for backend in self.backends:
            backend.log(step, metrics)
        if "train/reward" in metrics:
            acc = f"acc {metrics['train/accuracy']:.3f}  " if "train/accuracy" in metrics else ""  # math tasks
            head = (f"reward {metrics['train/reward']:.3f}  {acc}"
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
        held_out = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
        if held_out and not self.progress.disable:
            shown = "  ".join(f"{k} {v:.3f}" for k, v in held_out.items() if k != "mean_length")
            self.progress.console.print(f"step {step:>4}  eval {shown}")
        self.notify("on_log", step, metrics)
        if held_out:
            self.notify("on_evaluate", step, {k: v for k, v in metrics.items() if k.startswith("eval/")})

    def notify(self, event: str, *args: Any) -> None:
        """Call `event` (on_log, on_evaluate, on_save) on every callback that has it; a plain function is an
        on_log."""
        if not self.enabled:
            return
        for callback in self.callbacks:
            if hasattr(callback, event):
                getattr(callback, event)(*args)
            elif event == "on_log" and callable(callback):
                callback(*args)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Record a few completions (prompt, completion, reward, answer, ...: whatever keys the rows have) in
        samples.jsonl, and as the "completions" table of the backends that show tables (wandb, trackio)."""
        if not self.enabled:
            return
        with disk_errors(self.run_dir / "samples.jsonl", "The last checkpoint is intact; free space and resume"):
            for row in rows:
                self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
            self.samples_file.flush()
        if rows:
            columns = ["step", *dict.fromkeys(key for row in rows for key in row)]  # every row's keys, in order
            data = [[step, *(row.get(key) for key in columns[1:])] for row in rows]
            for backend in self.backends:
                backend.table(step, columns, data)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, error: type[BaseException] | None, *exc: Any) -> None:
        """`with monitor:` around a loop: closed when an error leaves it (a normal end logs on, then closes)."""
        if error is not None:
            self.close()

    def close(self) -> None:
        """Stop the progress bar, flush every file and finish every backend's run."""
        if not self.enabled or self.metrics_file.closed:
            return
        self.progress.stop()
        self.metrics_file.close()
        self.samples_file.close()
        for backend in self.backends:
            backend.close()
        self.backends = []  # a second close() (an error path after the first) finishes no run twice
