"""What both loops (GRPO in train.py, SFT in sft.py) share: the run's set-up, its state, checkpoints and exact
resume, the Ctrl-C and bad-step guards, held-out evaluation, and the finish.

A loop reads, top to bottom:

    run = setup_run(cfg, "GRPO")                           folder, seeds, policy, data and prompts
    opt = prepare_training(run, num_updates)               optimizer, schedule, the distributed strategy
    state = LoopState(PromptSampler(len(data), cfg.seed))  where the loop is: what a checkpoint saves
    monitor = start_loop(run, opt, state)                  resume (or evaluate before training), logging
    with Interrupt() as interrupt:
        for step in range(state.step + 1, cfg.max_steps + 1):
            ... the stage's own work ...
            end_step(run, opt, state, monitor, interrupt, step, all_skipped)   checkpoint, guards
    finish_run(run, monitor, state.before)                 final evaluation, the policy, curves

Nothing here knows GRPO or SFT: each loop's own state is passed in, never captured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

from minigrpo import rollout
from minigrpo.agent.turns import multi_turn
from minigrpo.checkpoint import (
    PENDING,
    checkpoints,
    load_checkpoint,
    load_policy_weights,
    save_checkpoint,
    save_final_policy,
    set_rng_state,
    shards_dir,
    start_checkpoint,
    verify_checkpoint,
)
from minigrpo.config import FIELDS, Config, load_config, save_config
from minigrpo.dist import Distributed
from minigrpo.errors import ConfigError, TrainingStopped
from minigrpo.evaluate import evaluate, evaluate_metric, resolve_metric
from minigrpo.model import (
    check_device,
    load_model,
    load_tokenizer,
    make_optimizer_class,
    prepare_tokenizer,
    trainable_parameters,
)
from minigrpo.monitor import (
    Monitor,
    check_report_to,
    claim_run_dir,
    disk_errors,
    print0,
    read_jsonl,
    release_run_dir,
    set_aside_run,
)
from minigrpo.tasks import reasoning_gym
from minigrpo.tasks.prompts import render_prompts, resolve_template, stop_strings
from minigrpo.tasks.rewards import RewardGuard
from minigrpo.tasks.sources import IN_MEMORY, Example, has_held_out, load_split, require_columns
from minigrpo.tools.plot import plot_run


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PromptSampler:
    """Endless shuffled passes over the dataset indices, reproducible from the seed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.gen, self.order, self.pos = size, torch.Generator().manual_seed(seed), [], 0
        self.drawn = 0  # indices handed out so far

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "order": list(self.order), "pos": self.pos, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        self.order, self.pos, self.drawn = list(state["order"]), state["pos"], state["drawn"]

    def take(self, n: int) -> list[int]:
        """The next n indices (a new permutation starts when a pass is used up)."""
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(self.size, generator=self.gen).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
            self.drawn += 1
        return out


class Interrupt:
    """`with Interrupt() as interrupt:` the first SIGINT (Ctrl-C), SIGTERM (how SLURM and Kubernetes pre-empt) or
    SIGUSR1 only sets `requested` (the loop finishes the step, saves a checkpoint and stops); a second one raises
    KeyboardInterrupt at once. `at_once`: the first one does (where nothing is left to save: the final evaluation).
    The previous handlers are back on leaving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, at_once: bool = False) -> None:
        self.requested, self._previous, self.at_once = at_once, {}, at_once

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal, or the first with at_once
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print0(f"{name}: finishing this step, then saving a checkpoint (again to stop at once)")

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


@dataclass
class Run:
    """What every stage starts from: the config, the run folder, the policy, the data and its prompts."""
    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    train_set: list[Example]
    eval_set: list[Example]
    train_prompts: list[str]
    eval_prompts: list[str]
    dist: Distributed = field(default_factory=Distributed)
    stage: str = "GRPO"  # "GRPO" or "SFT": a checkpoint resumes only in the stage that wrote it
    callbacks: list[Any] = field(default_factory=list)  # the Python API's (Inputs.callbacks)
    eval_guard: RewardGuard = field(default_factory=RewardGuard)  # the eval metric's time limit (setup_run)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class Optimization:
    """What updates the policy: the optimizer, its schedule, and the model the loss pass goes through (the
    strategy's wrapper under DDP / DeepSpeed / FSDP; the model itself in one plain process)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    wrapped: torch.nn.Module


@dataclass
class LoopState:
    """Where a loop is: what a checkpoint saves besides the weights, the optimizer and the RNG."""
    sampler: PromptSampler  # the data order and position
    step: int = 0  # the last finished step
    bad_streak: int = 0  # steps in a row whose every update was skipped (non-finite loss or gradient)
    quiet_streak: int = 0  # steps in a row whose rewards carried no learning signal (train.py warns)
    before: dict[str, float] = field(default_factory=dict)  # held-out metrics before training
    # overlapped rollouts (max_staleness > 0): the generator (rollout/overlap.py), whose batches sampled ahead a
    # checkpoint keeps (the data order is past their prompts), and those batches once a resume restored them
    generator: Any = None
    pending: list[dict[str, Any]] = field(default_factory=list)
    entropy: Any = None  # GRPO's entropy coefficient (algo.EntropyControl): adaptive, it is state to resume


@dataclass
class Inputs:
    """What the Python API (minigrpo/api.py) hands a loop besides the config: objects a YAML file cannot hold.
    The command line passes none of them; everything else is the same path."""
    model: Any = None  # a loaded model, used instead of loading cfg.model
    tokenizer: Any = None  # its tokenizer (default: loaded from cfg.model)
    train_set: list[Example] | None = None  # rows from Python (sources.rows_to_examples), instead of cfg.dataset
    eval_set: list[Example] | None = None  # held-out rows from Python, instead of cfg.eval_dataset
    callbacks: list[Any] = field(default_factory=list)  # objects with on_log / on_evaluate / on_save (api.py)


def setup_run(cfg: Config, stage: str = "GRPO", inputs: Inputs | None = None) -> Run:
    """Everything a bad value can stop first (the backend, the loggers, the device, the run folder's lock and
    whether it may be used, the data, the tokenizer, the template, the prompts, a resumed run's config), then the
    resolved config in the run folder, seeds and threads, and the model."""
    inputs = inputs or Inputs()
    rollout.check(cfg)  # the backend refuses at start, before any folder or download, when it cannot run
    check_report_to(cfg.report_to)  # so does a logging package that is not installed
    check_device(cfg.device)
    dist = Distributed(cfg.device)
    def claim() -> Path:  # the folder is this run's from here: a lock, and a run of another process is refused
        return dist.broadcast(claim_run_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir) if dist.main
                              else None)

    run_dir = claim() if cfg.output_dir else None  # a named folder at once; a new runs/<time> once the data is good
    cfg, tok, train_set, eval_set, train_prompts, eval_prompts = prepare_data(cfg, stage, inputs)
    run_dir = run_dir or claim()
    if dist.main:
        if cfg.resume:
            check_resume(cfg, run_dir, stage)
        elif cfg.overwrite_output_dir:  # the input is good: now the old run may move aside
            set_aside_run(run_dir)
        save_config(cfg, str(run_dir / "config.yaml"))
    if dist.world > 1:
        cfg = dataclasses.replace(cfg, device=str(dist.device))  # this process's device
    set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tok = load_model(cfg, tok, inputs.model)
    rollout.start(cfg, model, tok)
    return Run(cfg, run_dir, model, tok, train_set, eval_set, train_prompts, eval_prompts, dist, stage,
               inputs.callbacks, RewardGuard(cfg.reward_timeout, cfg.reward_timeout_limit))


# Keys a resumed run may change and still be the run that was started, bit for bit: where it logs, evaluates and
# saves, its guards. max_steps too when the learning rate is constant (a schedule is laid over max_steps).
RESUME_FREE = {"output_dir", "resume", "overwrite_output_dir", "resume_allow_changes", "save_steps",
               "vllm_logprob_tolerance",
               "save_total_limit", "logging_steps", "log_completions", "report_to", "eval_steps", "eval_limit",
               "eval_batch_size", "eval_metric", "eval_dataset", "eval_split", "max_bad_steps", "no_signal_steps",
               "reward_timeout", "reward_timeout_limit", "generator_timeout"}


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json: {"before", "after", "steps", "finished", "stage"}; written when training ends (finished false) and
    again after the final evaluation (finished true). None when the run has not ended training."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn by a kill: as if training had not ended (checkpoints decide)
    return summary | {"finished": summary.get("finished", summary.get("after") is not None)}


def check_resume(cfg: Config, run_dir: Path, stage: str) -> None:
    """Before any model loads: ConfigError when `resume` cannot continue this run folder exactly: a run that is
    finished, one that ended without a checkpoint of its last step and is asked for more steps, or a config that
    differs from the run's in keys that change the result (unless resume_allow_changes names them)."""
    summary, found = read_summary(run_dir), checkpoints(run_dir)
    last = found[-1][0] if found else 0
    if summary is not None:
        done = summary.get("stage", stage)
        if done != stage:
            raise ConfigError(f"{run_dir} is a run of {done}, not {stage}: resume it with "
                              f"`minigrpo {'train' if done == 'GRPO' else 'sft'} --resume {run_dir}`")
        steps = summary.get("steps", cfg.max_steps)
        if summary["finished"] and cfg.max_steps <= steps:
            longer = f"train it longer with a larger max_steps (--resume {run_dir} --max_steps {steps * 2})" \
                if last >= steps else f"train on from its policy in a new run (--model {run_dir}/model or the " \
                                      f"adapter: it kept no checkpoint of its last step to resume from)"
            raise ConfigError(f"resume: {run_dir} is a finished run ({steps} steps; summary.json): nothing to "
                              f"continue. Evaluate it with `minigrpo eval`, or {longer}")
        if cfg.max_steps > steps and last < steps:
            raise ConfigError(f"resume: {run_dir} ended training at step {steps} without a checkpoint of that "
                              f"step (save_steps: 0 keeps only the final policy), so it cannot continue exactly. "
                              f"Start a new run from its policy: --model {run_dir}/model (or the adapter)")
        if cfg.max_steps < steps:
            raise ConfigError(f"max_steps: {cfg.max_steps} is below the {steps} steps {run_dir} has done")
    if last > cfg.max_steps:
        raise ConfigError(f"max_steps: {cfg.max_steps} is below the {last} steps {run_dir} has done "
                          f"(checkpoint-{last})")
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved, now = load_config(str(path), strict=False).to_dict(), cfg.to_dict()
    except ConfigError as e:
        raise ConfigError(f"resume: the run's own config, {path}, is not valid here: {e}") from None
    free = RESUME_FREE | ({"max_steps"} if cfg.lr_scheduler_type == "constant" else set())
    allowed = set(FIELDS) if "all" in cfg.resume_allow_changes else set(cfg.resume_allow_changes)
    changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k] and k not in free | allowed
               and not (k == "template" and saved.get(k) == "auto")}  # a config written by hand, unresolved
    if changed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
        raise ConfigError(f"resume: the config differs from the run's ({path}) in keys that change the result: "
                          f"{shown}. Resume with the run's values, or accept the change with "
                          f"--resume_allow_changes={','.join(changed)} (the resumed run is then not the one that "
                          f"was started). Keys that may change: {', '.join(sorted(free))}")


def prepare_data(cfg: Config, stage: str, inputs: Inputs) -> tuple[Config, Any, list[Example], list[Example],
                                                                  list[str], list[str]]:
    """The data, the tokenizer, the template ("auto" made concrete: the returned config records it) and both
    splits' prompts, checked (columns the config needs, prompt lengths): what can be wrong with the input, found
    before any folder or model."""
    train_set = inputs.train_set if inputs.train_set is not None else load_split(cfg, cfg.train_split)
    eval_set = held_out(cfg, inputs.eval_set)
    tok = prepare_tokenizer(inputs.tokenizer) if inputs.tokenizer is not None else load_tokenizer(cfg)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg, tok, train_set))
    needs = required_columns(cfg, stage)
    require_columns(train_set, list(needs), f"{cfg.dataset} [{cfg.train_split}]", "; ".join(needs.values()))
    if stage == "GRPO" and "correctness" in cfg.reward_funcs:  # not on text answers (reasoning-gym's verifiers)
        reasoning_gym.check_correctness(train_set)
    if stage == "SFT":  # a target for every row: its completion, or its answer / worked solution
        require_columns([ex for ex in train_set if "completion" not in ex.columns], ["answer"],
                        f"{cfg.dataset} [{cfg.train_split}]", "an SFT row trains on its completion or answer")
    if eval_set:  # the held-out metric, found (and its columns checked) now, not at the first evaluation
        resolve_metric(cfg, eval_set)
    fewshot = train_set[:cfg.num_fewshot] if cfg.template == "fewshot" else None
    train_prompts = render_prompts(cfg, tok, train_set, fewshot, f"{cfg.dataset} [{cfg.train_split}]")
    eval_prompts = render_prompts(cfg, tok, eval_set, fewshot, f"{cfg.eval_dataset or cfg.dataset} [{cfg.eval_split}]")
    return cfg, tok, train_set, eval_set, train_prompts, eval_prompts


def required_columns(cfg: Config, stage: str) -> dict[str, str]:
    """The columns every training row must have for this config: column -> why."""
    needs = {}
    if stage == "GRPO" and "correctness" in cfg.reward_funcs:
        needs["answer"] = "the correctness reward compares to it"
    for name in ("code_tests", "code_tests_all"):
        if stage == "GRPO" and name in cfg.reward_funcs:
            needs["tests"] = f"the {name} reward runs the completion against them"
    if cfg.template == "fewshot":
        needs["answer"] = "the fewshot template shows solved examples"
    return needs


def held_out(cfg: Config, rows: list[Example] | None = None) -> list[Example]:
    """The evaluation rows: `rows` from Python, else eval_dataset, else the dataset's eval split. Never the
    training rows unless asked (eval_dataset naming the same file): a single .jsonl file or rows from Python
    with no eval set evaluate nothing, and say so."""
    if not cfg.eval_limit:
        return []
    if rows is not None:
        return rows[:cfg.eval_limit]
    if not has_held_out(cfg):
        rows = "the rows handed over from Python are" if cfg.dataset == IN_MEMORY else f"{cfg.dataset} holds"
        print0(f"no held-out evaluation: {rows} the training rows only; give eval_dataset (GRPOTrainer's "
               f"eval_dataset=, or a file: the same one to evaluate on the training rows) to evaluate")
        return []
    return load_split(cfg, cfg.eval_split, cfg.eval_limit, cfg.eval_dataset)


def make_optimizer(cfg: Config, model: torch.nn.Module, num_updates: int, cpu_offload: bool = False,
                   ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its learning-rate schedule.

    cpu_offload (DeepSpeed keeps the optimizer on the CPU): DeepSpeed's vectorised CPU AdamW."""
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam as optimizer_class  # optional dependency; adamw_mode
    else:
        optimizer_class = make_optimizer_class(cfg, next(model.parameters()).device)
    # torch's AdamW updates every tensor in one call per operation on any device (foreach; its default only on
    # GPUs): the same values as the per-tensor loop, a third faster for LoRA's many small tensors on a CPU
    foreach = {"foreach": True} if optimizer_class is torch.optim.AdamW else {}
    optimizer = optimizer_class(trainable_parameters(model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), **foreach)
    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=num_updates)


def step_schedule(scheduler: Any) -> None:
    """Advance the learning-rate schedule by one update, skipped updates included (torch would warn once that the
    optimizer did not step first: it did not, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


def prepare_training(run: Run, num_updates: int) -> Optimization:
    """The optimizer and schedule over `num_updates` updates, handed to the distributed strategy."""
    cfg, dist = run.cfg, run.dist
    optimizer, scheduler = make_optimizer(cfg, run.model, num_updates, dist.offloads_optimizer)
    wrapped, optimizer = dist.prepare(run.model, optimizer, cfg.per_device_train_batch_size, cfg.max_grad_norm)
    return Optimization(optimizer, scheduler, wrapped)


def run_eval(run: Run) -> dict[str, float]:
    """The held-out metric on greedy completions, split over processes: math accuracy (eval/accuracy, eval/format:
    the task metric, independent of the reward weights) or the run's eval_metric (eval/<name>)."""
    if not run.eval_prompts:
        return {}
    cfg, dist = run.cfg, run.dist
    name, metric = resolve_metric(cfg, run.eval_set)
    prompts, examples = dist.share(run.eval_prompts), dist.share(run.eval_set)
    turns = multi_turn(cfg)
    keys = ["accuracy", "format", "mean_length"] if metric is None else [name, "mean_length"]
    if metric is None and turns is not None and turns.tools:
        keys.append("tool_call_frequency")
    totals = [0.0] * (len(keys) + 1)
    with dist.full_weights(run.model):  # every process enters (ZeRO-3 gathers), even one without prompts
        if prompts:
            if metric is None:
                report = evaluate(run.model, run.tokenizer, prompts, [ex.columns["answer"] for ex in examples],
                                  max_new_tokens=cfg.max_completion_length, batch_size=cfg.eval_batch_size,
                                  backend=cfg.rollout_backend, stop=stop_strings(cfg), turns=turns,
                                  rows=[ex.columns for ex in examples], engine_decode=cfg.engine_decode)
            else:
                report = evaluate_metric(run.model, run.tokenizer, prompts, examples, metric, name,
                                         cfg.max_completion_length, cfg.eval_batch_size, cfg.rollout_backend,
                                         stop=stop_strings(cfg), guard=run.eval_guard, turns=turns,
                                         engine_decode=cfg.engine_decode)
            totals = [report[k] * len(prompts) for k in keys] + [len(prompts)]
    totals = dist.sum(totals)
    return {f"eval/{k}": v / totals[-1] for k, v in zip(keys, totals)}


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The held-out figure a run reports: eval/accuracy, else its eval metric; (name, value), or None."""
    keys = [k for k in metrics if k.startswith("eval/") and k != "eval/mean_length"]
    key = "eval/accuracy" if "eval/accuracy" in keys else (keys[0] if keys else None)
    return (key.removeprefix("eval/"), metrics[key]) if key else None


def trim_logs(run_dir: Path, step: int) -> None:
    """Drop metrics and samples logged after `step` (the steps a resumed run will do again), and a torn last line."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.is_file():
            keep = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
            os.replace(tmp, path)


def load_usable_checkpoint(run: Run) -> tuple[int, Path, dict[str, Any]] | None:
    """The newest checkpoint that is whole (its checksums match and it loads): (step, path, trainer state), its
    weights in the policy. A damaged one is set aside as checkpoint-N.damaged (nothing deleted), with a message,
    and the one before it is tried. None when the run has no checkpoint."""
    found, dist = checkpoints(run.run_dir), run.dist
    for done, path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                return done, path, load_checkpoint(path, None if dist.saves_shards else run.model)
            except Exception as e:  # noqa: BLE001  (unreadable in any way: the previous checkpoint is tried)
                problem = f"it cannot be read: {type(e).__name__}: {str(e)[:200]}"
        aside = path.with_name(f"{path.name}.damaged")
        dist.barrier()
        if dist.main:
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
        dist.barrier()
        print0(f"resume: {path} is damaged ({problem}); set aside as {aside.name}; "
               f"{'trying the checkpoint before it' if done != found[0][0] else 'no checkpoint before it'}")
    if found or list(run.run_dir.glob("checkpoint-*.damaged")):  # (set aside by this resume or an earlier one)
        raise ConfigError(f"resume: every checkpoint of {run.run_dir} is damaged (set aside as checkpoint-N.damaged); "
                          f"nothing to resume from exactly. Start afresh with overwrite_output_dir: true (the old "
                          f"run is kept), or give another output_dir")
    return None


def resume(run: Run, opt: Optimization, state: LoopState) -> bool:
    """With `resume: true`, load the run's last whole checkpoint (weights, optimizer, schedule, data position,
    counters, RNG last), falling back to the one before a damaged one; whether the run goes on from saved state.
    A run killed before its first checkpoint starts again; one killed after training, during its final
    evaluation, loads its final policy and only evaluates."""
    cfg, dist = run.cfg, run.dist
    if not cfg.resume:
        return False
    loaded = load_usable_checkpoint(run)
    summary = read_summary(run.run_dir)
    if loaded is None and summary is not None and not summary["finished"]:  # trained, not evaluated
        if dist.saves_shards:
            raise ConfigError(f"resume: {run.run_dir} ended training without a checkpoint; under "
                              f"{dist.strategy} its final evaluation cannot be resumed: run `minigrpo eval`")
        load_policy_weights(run.model, run.run_dir / ("adapter" if cfg.use_peft else "model"))
        state.step, state.before = summary["steps"], summary["before"]
        print0(f"resume: {run.run_dir} finished training (step {state.step}); its final evaluation runs now")
        return True
    if loaded is None:  # killed before its first checkpoint: nothing to keep
        print0(f"resume: no complete checkpoint in {run.run_dir} yet: starting at step 1")
        if dist.main:
            trim_logs(run.run_dir, -1)
        return False
    done, path, saved = loaded
    stage = saved.get("stage", "GRPO")
    if stage != run.stage:
        raise ConfigError(f"{path} is a checkpoint of {stage}, not {run.stage}: resume it with "
                          f"`minigrpo {'train' if stage == 'GRPO' else 'sft'} --resume {run.run_dir}`")
    launch = saved.get("launch", {"strategy": None, "world": 1})
    launched = {"strategy": launch.get("strategy", launch.get("engine")), "world": launch["world"]}
    if dist.saves_shards and launched != {"strategy": dist.strategy, "world": dist.world}:
        raise ConfigError(f"{path} holds {launched['strategy'] or 'one-process'} shards of {launched['world']} "
                          f"process(es); this launch is {dist.strategy} with {dist.world}: resume it the "
                          f"way it was launched (same accelerate config and process count)")
    if dist.saves_shards:  # DeepSpeed / FSDP: each process loads its shards of weights and optimizer
        dist.load_shards(shards_dir(path))
    else:
        opt.optimizer.load_state_dict(saved["optimizer"])
    opt.scheduler.load_state_dict(saved["scheduler"])
    state.sampler.load_state_dict(saved["sampler"])
    state.step, state.bad_streak, state.before = done, saved["bad_streak"], saved["before"]
    state.quiet_streak = saved.get("quiet_streak", 0)
    if state.entropy is not None and state.entropy.adaptive and "entropy_control" in saved:
        state.entropy.coef = saved["entropy_control"]["coef"]
        state.entropy.last_entropy = saved["entropy_control"]["last_entropy"]
    state.pending = load_pending(run, path, launched["world"])
    if dist.main:
        trim_logs(run.run_dir, done)
    set_rng_state(saved["rng"])  # last: nothing may draw between here and the next step
    print0(f"resumed from {path}: continuing at step {done + 1}")
    return True


def start_loop(run: Run, opt: Optimization, state: LoopState, show_progress: bool = True) -> Monitor:
    """Resume when asked, else evaluate the policy before training; the monitor that logs the steps."""
    resumed = resume(run, opt, state)
    monitor = Monitor(run.run_dir, run.cfg.max_steps, run.cfg.logging_steps, show=show_progress, stage=run.stage,
                      enabled=run.dist.main, report_to=run.cfg.report_to, config=run.cfg.to_dict(),
                      callbacks=run.callbacks)
    if not resumed:
        state.before = run_eval(run)
        if state.before:
            monitor.log(0, state.before)
            name, value = headline(state.before)
            print0(f"held-out {name} before training: {value:.3f} (n={len(run.eval_set)}, greedy)")
    return monitor


def load_pending(run: Run, path: Path, world: int) -> list[dict[str, Any]]:
    """This process's batches sampled ahead that checkpoint `path` kept (overlapped rollouts), if any."""
    dist = run.dist
    files = sorted(path.glob(PENDING.format(rank="*")))
    if not files:
        return []
    if world != dist.world:  # each process's batches are its share of the prompts: they do not re-split
        print0(f"[bold yellow]warning:[/] {path} holds the batches sampled ahead of {world} process(es), this launch "
               f"has {dist.world}: they are dropped (their {len(files)} x prompts are skipped in the data order)")
        return []
    return torch.load(path / PENDING.format(rank=dist.rank), weights_only=False)


def resume_hint(run: Run) -> str:
    """How to continue this run: the command, or (rows or functions from Python) the trainer call."""
    command = "train" if run.stage == "GRPO" else "sft"
    saved = run.cfg.to_dict()
    python = run.cfg.dataset == IN_MEMORY or any(str(name).startswith("python:") for name in
                                                 saved["reward_funcs"] + saved["tools"] + [saved["environment"]])
    return (f"the same trainer with output_dir={str(run.run_dir)!r}, resume=True (its rows or functions came "
            f"from Python)") if python else f"`minigrpo {command} --resume {run.run_dir}`"


def save(run: Run, opt: Optimization, state: LoopState) -> Path:
    """checkpoint-{state.step}: policy, optimizer (or the strategy's shards), schedule, loop state, RNG."""
    cfg, dist = run.cfg, run.dist
    saved = {"stage": run.stage, "scheduler": opt.scheduler.state_dict(), "sampler": state.sampler.state_dict(),
             "bad_streak": state.bad_streak, "quiet_streak": state.quiet_streak, "before": state.before,
             "launch": {"strategy": dist.strategy, "world": dist.world}}
    saved |= {} if dist.saves_shards else {"optimizer": opt.optimizer.state_dict()}
    if state.entropy is not None and state.entropy.adaptive:
        saved["entropy_control"] = {"coef": state.entropy.coef, "last_entropy": state.entropy.last_entropy}
    weights = dist.policy_state()  # ZeRO-3 / FSDP: gathered from every process; else None
    final = run.run_dir / f"checkpoint-{state.step}"
    with disk_errors(final, f"The previous checkpoint is intact; free space and continue with {resume_hint(run)}"):
        tmp = dist.broadcast(start_checkpoint(run.run_dir, state.step) if dist.main else None)
        dist.save_shards(shards_dir(tmp))  # DeepSpeed / FSDP: every process writes its shards
        # each process's batches sampled ahead (in flight ones waited for), or those a resume restored and the
        # loop has not taken yet (resumed with max_staleness 0)
        ahead = state.generator.state_dict() if state.generator is not None else state.pending
        if ahead or state.generator is not None:
            torch.save(ahead, tmp / PENDING.format(rank=dist.rank))
        dist.barrier()
        if dist.main:  # the rest is the same on every process (RNG: process 0's)
            save_checkpoint(run.run_dir, state.step, run.model, run.tokenizer, saved, cfg.save_total_limit, weights)
        dist.barrier()
    return final


def end_step(run: Run, opt: Optimization, state: LoopState, monitor: Monitor, interrupt: Interrupt, step: int,
             all_skipped: bool) -> None:
    """After step `step` is logged: checkpoint when due, and stop (TrainingStopped, checkpoint saved) on Ctrl-C or
    after max_bad_steps steps in a row whose every update was skipped."""
    cfg = run.cfg
    state.step = step
    state.bad_streak = state.bad_streak + 1 if all_skipped else 0
    too_bad = cfg.max_bad_steps and state.bad_streak >= cfg.max_bad_steps
    due = cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.max_steps)
    if not (due or interrupt.requested or too_bad):
        return
    path = save(run, opt, state)
    monitor.notify("on_save", step, path)
    if too_bad:  # skipped updates left the weights as the last good update made them
        monitor.close()
        raise TrainingStopped(f"step {step}: {state.bad_streak} steps in a row had a non-finite loss or gradient "
                              f"(every update skipped). The policy as of the last good update is in {path}. "
                              f"Lower learning_rate, look for huge or NaN rewards, or set max_bad_steps: 0 to "
                              f"go on regardless.")
    if interrupt.requested:
        monitor.close()
        raise TrainingStopped(f"interrupted: checkpoint of step {step} saved in {path}; continue with "
                              f"{resume_hint(run)}")


def write_summary(run: Run, before: dict[str, float], after: dict[str, float] | None) -> None:
    """summary.json (read_summary), replaced whole."""
    tmp = run.run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps({"before": before, "after": after, "steps": run.cfg.max_steps,
                               "finished": after is not None, "stage": run.stage}, indent=2))
    os.replace(tmp, run.run_dir / "summary.json")


def finish_run(run: Run, monitor: Monitor, before: dict[str, float]) -> Path:
    """The trained policy and summary.json first (nothing to lose after that), then the final evaluation, the
    summary with it, and curves.png; returns the run folder. Ctrl-C during the final evaluation stops it at once:
    resuming the run evaluates the saved policy."""
    cfg, dist = run.cfg, run.dist
    policy = run.run_dir / ("adapter" if cfg.use_peft else "model")
    weights = dist.policy_state()  # ZeRO-3 / FSDP: gathered from every process; else None
    if dist.main:
        with disk_errors(policy, f"Free space and continue with {resume_hint(run)}"):
            save_final_policy(run.model, run.tokenizer, policy, weights)
            write_summary(run, before, None)
    dist.barrier()
    try:
        with Interrupt(at_once=True):
            after = run_eval(run)
    except KeyboardInterrupt:
        monitor.close()
        raise TrainingStopped(f"final evaluation interrupted; the trained policy is saved in {policy}; to run the "
                              f"final evaluation and end the run, continue with {resume_hint(run)}") from None
    if after:
        monitor.log(cfg.max_steps, after)
        (name, value), earlier = headline(after), headline(before)
        print0(f"held-out {name}: before {earlier[1]:.3f} -> after {value:.3f}" if earlier else
               f"held-out {name} after training: {value:.3f}")
    monitor.close()
    if dist.main:
        write_summary(run, before, after)
        print0(f"curves: {plot_run(run.run_dir)}\nrun folder: {run.run_dir}")
        release_run_dir(run.run_dir)
    dist.barrier()
    return run.run_dir
