"""Run by tests/distributed/test_distributed.py under `accelerate launch` (DeepSpeed, 2 CPU processes): a step with a
non-finite gradient is skipped (weights untouched, reported), the next finite one is applied."""

import os
import types

import torch

from minigrpo.dist import Distributed

ranks = Distributed("cpu")
assert ranks.strategy == "deepspeed" and ranks.world == 2, (ranks.strategy, ranks.world)
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
model.config = types.SimpleNamespace(hidden_size=4)  # accelerate sizes DeepSpeed's buffers from it
if ranks.offloads_optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam as Adam
else:
    from torch.optim import AdamW as Adam
wrapped, optimizer = ranks.prepare(model, Adam(model.parameters(), lr=0.1), micro_batch=2, max_grad_norm=1.0)
x = torch.randn(2, 4) + ranks.rank


def update(scale: float) -> tuple[float, bool, torch.Tensor]:
    before = model.weight.detach().clone()
    ranks.backward(wrapped(x).square().sum() * scale, last=True)
    norm, applied = ranks.step(optimizer, list(model.parameters()), 1.0)
    return norm, applied, (model.weight.detach() - before).abs().max()


norm, applied, moved = update(1.0)
assert applied and norm > 0 and moved > 0, (norm, applied, moved)
norm, applied, moved = update(float("nan"))
assert not applied and moved == 0, (norm, applied, moved)
norm, applied, moved = update(1.0)
assert applied and moved > 0 and torch.isfinite(model.weight).all(), (norm, applied, moved)
ranks.barrier()  # both done before either leaves
print(f"rank {ranks.rank}: ok", flush=True)
# torch 2.13 + gloo: a background thread can abort the interpreter's teardown now and then ("terminate called
# without an active exception", SIGABRT, seen once in CI on 2026-12-01) after everything above passed; leave without
# the teardown, as fsdp_generate.py does.
os._exit(0)
