"""Run by tests/distributed/test_distributed.py under torchrun (2 CPU processes, gloo): FSDP2-sharded generation.

Each process generates for different prompts and lengths inside `fsdp2_unsharded` (no collective per
token, so no lockstep) and must get the tokens the unsharded model gives; training still works after."""

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from minigrpo.dist import fsdp2_unsharded
from minigrpo.rollout.engine import engine_generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tiny import tiny_model, tiny_tokenizer

dist.init_process_group("gloo")
rank = dist.get_rank()
tok = tiny_tokenizer()
model = tiny_model(tok)
prompts = [["1+1=", "2+2="], ["33 plus 9 is what number?"]][rank]  # different counts and lengths
params = SamplingParams(n=2, max_new_tokens=12 + 10 * rank, temperature=1.0, seeds=[5 + rank] * len(prompts))
expected = engine_generate(model, tok, prompts, params)
mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
weight = model.model.layers[0].mlp.up_proj.weight
assert type(weight).__name__ == "DTensor" and weight.to_local().shape[0] * 2 == weight.shape[0]
with fsdp2_unsharded(model):
    got = engine_generate(model, tok, prompts, params)
assert torch.equal(got.completion_ids, expected.completion_ids), rank
model(input_ids=got.completion_ids[:, :4]).logits.sum().backward()  # sharded again: forward/backward
assert weight.grad is not None and weight.grad.to_local().shape == weight.to_local().shape
dist.barrier()
print(f"rank {rank}: ok", flush=True)
# torch 2.13 + gloo: FSDP2's threads abort the interpreter's teardown now and then ("terminate called
# without an active exception") after everything above passed; leave without the teardown.
os._exit(0)
