"""Overlapped rollouts: a generator process beside the trainer, `max_staleness` = k batches ahead.

While the trainer updates on batch j, the generator samples batches j+1 .. j+k. Which weights sample which batch
is fixed, not left to timing: batch j is sampled with the policy after update max(0, j-1-k) (its version), so a
run is reproducible, each batch is exactly min(j-1, k) updates stale, and a resumed run goes on as the
uninterrupted one. k = 0 is the synchronous loop and starts no process at all.

On one machine: the process is spawned (not forked: OpenMP pools, CUDA and gloo do not survive a fork) with a copy
of the policy whose frozen weights ARE the trainer's (shared memory, no second copy of a LoRA base), and k + 1
shared slots for the trainable weights. After update v the trainer copies its trainable weights into slot
v mod (k+1) (`push`); each request names its version, and the generator loads that slot before sampling. Version v
samples batches up to v+1+k, and the trainer overwrites its slot with version v+k+1 only after it took batch v+k+1:
no lock is needed.

Batches come back unscored: rewards run in the trainer (they may be Python functions, and the reward guard's time
limits and counts are the trainer's). The batch keeps the sampler's log-probs: the trainer weights the loss by
the ratio of the current policy to them (train.py SamplerCheck, algo.py sampler_correction).

Several training processes: each has its own generator, for its share of the prompts. A generator elsewhere (other
GPUs or nodes) would be vLLM's server mode fed weights over NCCL, as TRL's `vllm-serve` does: not built (README).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import faulthandler
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from minigrpo import rollout
from minigrpo.errors import ConfigError, NonFiniteError, TrainingStopped
from minigrpo.rollout.types import Rollout, SamplingParams


class GeneratorError(TrainingStopped):
    """The generator process died, failed or stopped answering: the run stops (exit 3) with its reason."""


@dataclass
class Batch:
    """A batch sampled ahead: the step it is for, the policy version that samples it (the update it follows),
    this process's dataset rows and sampling seeds; once generated, the rollout and its seconds."""
    step: int
    version: int
    rows: list[int]
    seeds: list[int]
    rollout: Rollout | None = None
    generate_s: float = 0.0


def raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one (as torch's DataLoader advice goes): a model shared with
    another process holds one descriptor per tensor, past 1024 for a model with LoRA on every linear layer."""
    try:
        import resource  # here: POSIX only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def saved_batch(d: dict[str, Any]) -> Batch:
    """A Batch from `Generator.state_dict`'s plain data (its rollout None when it is still to be sampled)."""
    ro = d["rollout"]
    return Batch(**(d | {"rollout": None if ro is None else Rollout(**ro)}))


def version_for(step: int, ahead: int) -> int:
    """The update whose policy samples the batch of `step` with k = `ahead` batches sampled ahead."""
    return max(0, step - 1 - ahead)


class Generator:
    """The generator process and its queues, used as a context manager (the process is stopped on leaving).

    `submit` queues a batch (sampled in order), `take` returns the oldest one (waiting at most `timeout` seconds),
    `push` hands over the trainable weights after an update.
    `state_dict` returns the batches not taken yet (a checkpoint keeps them: the data order has already moved past
    their prompts): generated, or, those to be sampled with the weights pushed last (the checkpoint's), as requests
    a resume samples again (`restore`, `resubmit`); older ones in flight are waited for."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, backend: str, merge_lora: bool, ahead: int,
                 timeout: float, threads: int) -> None:
        self.timeout = timeout
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # The child's policy: frozen weights are the trainer's own tensors (the memo hands them to the copy as
        # they are; the spawn moves them into shared memory), trainable ones its own copies.
        memo: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
        memo |= {id(b): b for b in model.buffers()}
        child_model = copy.deepcopy(model, memo)
        self.slots = [{n: p.detach().clone() for n, p in trainable.items()} for _ in range(ahead + 1)]
        for slot in self.slots:
            for t in slot.values():
                t.share_memory_()
        self.tags = torch.full((ahead + 1,), -1, dtype=torch.long).share_memory_()  # each slot's version
        raise_open_files_limit()  # every tensor shared with the child holds a file descriptor
        ctx = mp.get_context("spawn")
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=serve, name="minigrpo-generator", daemon=True,
                                args=(child_model, tokenizer, backend, merge_lora, self.slots, self.tags,
                                      self.requests, self.results, threads, os.getpid()))
        # The trainer's signals (Ctrl-C, SIGTERM, SIGUSR1: finish the step, save, stop) are blocked while the child
        # starts, so that it inherits them blocked and ignores them before it unblocks them (serve).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS) if hasattr(signal, "pthread_sigmask") \
            else None
        try:
            self.proc.start()
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # a hook or layer that cannot be sent
            raise ConfigError(f"max_staleness: the policy cannot be sent to the generator process ({e}): a layer "
                              f"or hook of it does not pickle; set max_staleness: 0") from e
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        del child_model  # the child holds it now; ours would keep a second copy of the trainable weights
        self.inflight: collections.deque[Batch] = collections.deque()  # submitted, not yet come back
        self.ready: collections.deque[Batch] = collections.deque()  # come back (or restored), not taken
        self.last_step = 0  # the last step a batch was submitted or restored for (or done: a resume sets it)
        self.version = -1  # the last version pushed
        self.unsent: list[Batch] = []  # restored requests, to be submitted again once their version is pushed
        # The queue's messages are read whole by a thread: a message half written by a process that then froze
        # would block a reader forever, and the wait for `received` keeps its time limit.
        self.received: queue.Queue[tuple] = queue.Queue()
        threading.Thread(target=self._read, name="minigrpo-generator-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.results.get()
            except (EOFError, OSError, ValueError):  # the process died mid-message, or the queue was closed
                self.received.put(("gone", None))
                return
            self.received.put(message)
    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def push(self, model: torch.nn.Module, version: int) -> float:
        """Copy the trainable weights after update `version` into its slot; returns the seconds it took."""
        t0 = time.perf_counter()
        index = version % len(self.slots)
        # a batch still to be sampled from this slot's older version is waited for first (after a resume with a
        # smaller k, restored batches can reach further ahead than k + 1 slots cover)
        while any(b.version != version and b.version % len(self.slots) == index for b in self.inflight):
            self._receive()
        slot, self.version = self.slots[index], version
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in slot:
                    slot[name].copy_(p.detach())
        if any(t.is_cuda for t in slot.values()):  # the copies are asynchronous: done before the child reads them
            torch.cuda.synchronize()
        self.tags[index] = version
        return time.perf_counter() - t0

    def submit(self, batch: Batch, prompts: list[str], params: SamplingParams) -> None:
        """Queue `batch` (its version's weights pushed already), sampled from `prompts` with `params`."""
        if batch.step <= self.last_step:
            raise ValueError(f"batch of step {batch.step} submitted after step {self.last_step}'s")
        self.requests.put((batch.step, batch.version, prompts, dataclasses.replace(params, seeds=batch.seeds)))
        self.inflight.append(batch)
        self.last_step = batch.step

    def restore(self, saved: list[dict[str, Any]]) -> None:
        """Batches a checkpoint kept (`state_dict`), to be taken first: generated ones, and requests `resubmit`
        sends again (in order, after the generated ones: their versions are the newest)."""
        for d in saved:
            batch = saved_batch(d)
            (self.ready if batch.rollout is not None else self.unsent).append(batch)
            self.last_step = max(self.last_step, batch.step)

    def resubmit(self, prompts: list[list[str]], params: SamplingParams) -> None:
        """Send the restored requests again (`prompts`: each one's), with the weights pushed since (their own)."""
        for batch, texts in zip(self.unsent, prompts, strict=True):
            batch.version = self.version  # the same weights: the checkpoint's
            self.requests.put((batch.step, batch.version, texts, dataclasses.replace(params, seeds=batch.seeds)))
            self.inflight.append(batch)
        self.unsent = []

    def take(self) -> Batch:
        """The oldest batch not taken, waiting for it to be generated; GeneratorError if the process died,
        failed, or sent nothing for `timeout` seconds."""
        if not self.ready:
            self._receive()
        return self.ready.popleft()

    def state_dict(self) -> list[dict[str, Any]]:
        """The batches not taken yet, as plain data: generated ones (those in flight from older weights are waited
        for), then those to be sampled with the weights pushed last, without their rollout."""
        while self.inflight and self.inflight[0].version < self.version:
            self._receive()
        return [dataclasses.asdict(b) for b in (*self.ready, *self.inflight, *self.unsent)]

    def _receive(self) -> None:
        """Wait for the oldest batch in flight and move it to `ready`."""
        batch = self.inflight[0]
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = self.received.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                if message[0] == "gone":
                    raise queue.Empty
                break
            except queue.Empty:
                self.proc.join(timeout=0.1 if self.proc.is_alive() else 0)  # (a dying process: its exit code)
                if not self.proc.is_alive() and self.received.empty():  # (its last message may have just come)
                    code = self.proc.exitcode
                    how = (f"signal {signal.Signals(-code).name}" if code is not None and code < 0
                           else f"exit code {code}")
                    raise GeneratorError(f"the generator process (pid {self.proc.pid}) died ({how}) while "
                                         f"sampling the batch of step {batch.step}, and sent no traceback (killed "
                                         f"from outside, or out of memory: see the system log)") from None
                if time.monotonic() >= deadline:
                    self._dump_stacks()
                    self.proc.kill()  # stuck: asking it to stop would wait in vain
                    self.close()
                    raise GeneratorError(f"the generator process sent no batch for step {batch.step} in "
                                         f"{self.timeout:g} s (generator_timeout) and was stopped (its stacks, if it "
                                         f"could print them, are above). A generation that is slow, not stuck, "
                                         f"needs a larger generator_timeout") from None
        kind, step, *rest = message
        if kind == "nonfinite":
            raise NonFiniteError(rest[0])
        if kind == "error":
            raise GeneratorError(f"the generator process failed while sampling the batch of step {step}:\n"
                                 f"{rest[0]}")
        version, data, seconds = rest
        ro = pickle.loads(data)
        if (step, version) != (batch.step, batch.version):  # requests are served in order: a bug if not
            raise RuntimeError(f"generator answered step {step} (version {version}) for step {batch.step} "
                               f"(version {batch.version})")
        self.inflight.popleft()
        batch.rollout, batch.generate_s = ro, seconds
        self.ready.append(batch)

    def _dump_stacks(self) -> None:
        """Ask a stuck process to print its Python stacks (faulthandler, SIGUSR2), and give it a moment."""
        if self.proc.is_alive() and hasattr(signal, "SIGUSR2"):
            os.kill(self.proc.pid, signal.SIGUSR2)
            time.sleep(1.0)

    def close(self) -> None:
        """Stop the process (asked, then killed) and drop the queues; safe to call twice."""
        if self.proc.is_alive():
            self.requests.put(None)
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.inflight.clear()
        for q in (self.requests, self.results):
            q.cancel_join_thread()  # a killed reader must not make our exit wait on the queue's pipe
            q.close()


TRAINER_SIGNALS = {signal.SIGINT, signal.SIGTERM, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])}


def serve(model: torch.nn.Module, tokenizer: Any, backend: str, merge_lora: bool,
          slots: list[dict[str, torch.Tensor]], tags: torch.Tensor, requests: Any, results: Any, threads: int,
          parent: int) -> None:
    """The generator process: load the requested version's weights, sample, send the rollout back; in order.
    Ctrl-C, SIGTERM and SIGUSR1 are the trainer's to handle (it finishes its step, saves, and stops this process);
    the process ends when asked, when it fails (its traceback sent), or when the trainer is gone.

    Rollouts go back pickled by value: tensors sent as shared memory would have to be fetched from this process
    when the trainer reads them, and it may be gone by then (after a failure, the trainer still reads the batches
    sent before it)."""
    for sig in TRAINER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TRAINER_SIGNALS)
    if hasattr(signal, "SIGUSR2"):
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # the trainer's timeout asks for the stacks
    if threads:
        torch.set_num_threads(threads)
    params, loaded = dict(model.named_parameters()), None
    while True:
        try:
            message = requests.get(timeout=1.0)
        except queue.Empty:
            message = ()
        if os.getppid() != parent:  # the trainer died without stopping us: leave at once (a result no one reads
            os._exit(0)  # would hold a normal exit, which flushes the queue, forever)
        if message == ():
            continue
        if message is None:
            return
        step, version, prompts, params_ = message
        try:
            if version != loaded:
                index = version % len(slots)
                before = int(tags[index])
                with torch.no_grad():
                    for name, t in slots[index].items():
                        params[name].copy_(t)
                if before != version or int(tags[index]) != version:  # a bug in the trainer's slot bookkeeping
                    raise RuntimeError(f"weight slot {index} held version {before} -> {int(tags[index])} while "
                                       f"step {step} asked for version {version}")
                loaded = version
            t0 = time.perf_counter()
            ro = rollout.generate(backend, model, tokenizer, prompts, params_, merge_lora)
            results.put(("ok", step, version, pickle.dumps(ro), time.perf_counter() - t0))
        except NonFiniteError as e:
            results.put(("nonfinite", step, str(e)))
            return
        except BaseException:  # noqa: BLE001 - everything goes back to the trainer, which reports it
            results.put(("error", step, traceback.format_exc()))
            return
