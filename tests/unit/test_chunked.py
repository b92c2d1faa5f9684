"""Chunked log-probs: the LM head runs on chunks of completion tokens (recomputed in backward); same values and
gradients as full logits, and far less peak memory at a large vocabulary."""

import subprocess
import sys
import textwrap

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigrpo.config import Config
from minigrpo.logprobs import policy_logprobs, split_head
from minigrpo.model import load_model
from minigrpo.rollout.engine import engine_generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.prompts import build_prompt
from minigrpo.tasks.sources import load_split


def _batch(use_peft):
    torch.manual_seed(0)  # the same adapters whatever ran before
    cfg = Config(use_peft=use_peft, lora_r=4)
    model, tok = load_model(cfg)
    if use_peft:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    prompts = [build_prompt(tok, ex.question, cfg.template, cfg.system_prompt) for ex in load_split(cfg, "test", 4)]
    torch.manual_seed(1)
    ro = engine_generate(model, tok, prompts, SamplingParams(n=4, max_new_tokens=24))
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    return model.train(), ro, ids, attention


def test_chunked_logprobs_and_grads_equal_full_logits(monkeypatch):
    import minigrpo.logprobs

    monkeypatch.setattr(minigrpo.logprobs, "SMALL_LOGITS", 0)  # chunk even the tiny model's logits
    for use_peft in (True, False):
        model, ro, ids, attention = _batch(use_peft)
        C, mask = ro.completion_ids.shape[1], ro.completion_mask
        assert mask.sum() > 3 * 7  # several chunks of 7 tokens
        params = [p for p in model.parameters() if p.requires_grad]
        results = {}
        for chunk in (0, 7, 10**6):  # 0: full logits through the model's own forward
            for G in (1, 4):  # plain layout, and the grouped one
                logp, ent = policy_logprobs(model, ids, attention, C, 0.8, group_size=G, chunk_size=chunk)
                grads = torch.autograd.grad((logp * mask).sum() + 0.1 * (ent * mask).sum(), params)
                results[chunk, G] = (logp * mask, ent * mask, grads)
        ref_logp, ref_ent, ref_grads = results[0, 1]
        for key, (logp, ent, grads) in results.items():
            torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
            torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
            for a, b in zip(grads, ref_grads):
                # fp32 sums over ~500 tokens in another order: ~1e-4 apart; a wrong path is off by O(grad)
                torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-3, msg=lambda m, key=key: f"{key}: {m}")
        logp, ent = policy_logprobs(model, ids, attention, C, 0.8, chunk_size=7)
        assert (logp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all()  # after EOS: nothing computed


def test_split_head_falls_back_when_the_forward_does_more_than_the_head():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    assert split_head(model) is not None
    odd = LlamaForCausalLM(cfg)
    odd.forward_original = odd.forward
    odd.forward = lambda *a, **k: type("O", (), {"logits": odd.forward_original(*a, **k).logits * 2})()
    assert split_head(odd) is None  # a forward that rescales the logits: the full-logits path is used


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from minigrpo.logprobs import policy_logprobs
    def hwm():  # this process's peak RSS in KiB: VmHWM starts afresh at exec (ru_maxrss keeps the parent's)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50000, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    B, P, C = 16, 8, 128
    ids = torch.randint(1, 50000, (B, P + C))
    attention = torch.ones_like(ids)
    policy_logprobs(model, ids[:2, :P + 4], attention[:2, :P + 4], 4, 1.0, chunk_size=2)  # warm-up
    base = hwm()
    logp, ent = policy_logprobs(model, ids, attention, C, 1.0, chunk_size=int(sys.argv[1]))
    (logp.sum() + ent.sum()).backward()
    print((hwm() - base) / 1024)
""")


def _peak_mb(chunk: int) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(chunk)], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return float(out.stdout.strip().splitlines()[-1])


def test_chunked_path_peak_memory_is_much_lower_at_a_large_vocabulary():
    # 16 x 128 completion tokens x 50k vocab: 410 MB per fp32 copy of the logits.
    full, chunked = _peak_mb(0), _peak_mb(256)
    assert full > 800, full  # logits, log-softmax and their gradients
    assert chunked < 0.25 * full, (chunked, full)
