"""The rollout engine: greedy = HF generate, reproducible sampling, the sampled distribution is the model's."""

import math

import pytest
import torch

from minigrpo.logprobs import policy_logprobs
from minigrpo.rollout import engine
from minigrpo.rollout.engine import engine_generate, sample_tokens
from minigrpo.rollout.hf import hf_generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.arith import arith_rows
from minigrpo.tiny import arith_model, arith_tokenizer, tiny_model, tiny_tokenizer


def _prompts(tok, n=6):
    qs = [row["question"] for row in arith_rows("test", n)]
    if n > 1:
        qs[1] = qs[1][:20]  # prompts of different lengths: left padding must not change the result
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in qs]


@pytest.mark.parametrize("family", ["byte", "arith"])
def test_greedy_equals_hf_generate(family):
    tok = tiny_tokenizer() if family == "byte" else arith_tokenizer()
    model = tiny_model(tok, seed=4) if family == "byte" else arith_model(tok, seed=4, hidden=64, layers=2)
    greedy = SamplingParams(n=1, max_new_tokens=24, temperature=0.0)
    ours, ref = engine_generate(model, tok, _prompts(tok), greedy), hf_generate(model, tok, _prompts(tok), greedy)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert ours.completions == ref.completions
    assert torch.equal(ours.completion_mask, ref.completion_mask)


def test_sampling_reproducible_and_logprobs_match_trainer():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=5)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=0.8)
    torch.manual_seed(123)
    a = engine_generate(model, tok, _prompts(tok, 2), params)
    torch.manual_seed(123)
    b = engine_generate(model, tok, _prompts(tok, 2), params)
    p0, p1 = _prompts(tok, 2)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.prompts == [p0] * 4 + [p1] * 4
    # The engine's sampled log-probs are the trainer's log-probs of the same tokens at the same temperature.
    ids = torch.cat([a.prompt_ids, a.completion_ids], 1)
    attention = torch.cat([a.prompt_mask, a.completion_mask.long()], 1)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, ids, attention, a.completion_ids.shape[1], 0.8)
    torch.testing.assert_close(a.logprobs, logp * a.completion_mask, atol=1e-4, rtol=1e-4)


def _first_token_counts(params, n=6000):
    tok = arith_tokenizer()
    model = arith_model(tok, seed=6, hidden=64, layers=2)
    prompt = _prompts(tok, 1)
    torch.manual_seed(7)
    ro = engine_generate(model, tok, prompt, SamplingParams(n=n, max_new_tokens=1, temperature=params.temperature,
                                                            top_k=params.top_k, top_p=params.top_p))
    with torch.no_grad():
        ids = ro.prompt_ids[:1]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    counts = torch.bincount(ro.completion_ids[:, 0], minlength=logits.shape[0]).float()
    return counts, logits


def _assert_matches(counts, probs):
    n = counts.sum()
    expected = n * probs
    keep = expected > 5  # Pearson chi-square over the well-populated tokens, the rest pooled
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    rest_obs, rest_exp = counts[~keep].sum(), expected[~keep].sum()
    if rest_exp > 5:
        chi2 += (rest_obs - rest_exp) ** 2 / rest_exp
    dof = int(keep.sum()) - 1 + int(rest_exp > 5)
    # The chi-square 99.9% quantile is below dof + 4.5 sqrt(2 dof) + 10 for these dof (Wilson-Hilferty).
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof) + 10, (chi2, dof)


def test_sampled_distribution_matches_model():
    counts, logits = _first_token_counts(SamplingParams(temperature=0.7))
    _assert_matches(counts, torch.softmax(logits / 0.7, -1))
    # and a wrong temperature is detected: the same counts do not fit softmax(logits / 1.5)
    with pytest.raises(AssertionError):
        _assert_matches(counts, torch.softmax(logits / 1.5, -1))


def test_top_k_and_top_p_restrict_and_renormalise():
    counts, logits = _first_token_counts(SamplingParams(temperature=1.0, top_k=5))
    top = torch.topk(logits, 5).indices
    assert counts[top].sum() == counts.sum()  # nothing outside the top 5
    probs = torch.zeros_like(logits)
    probs[top] = torch.softmax(logits[top], -1)
    _assert_matches(counts, probs)
    # top-p: the smallest prefix of the sorted distribution reaching p; nothing else is ever drawn
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    p = torch.softmax(logits, -1)[0]  # [0.61, 0.22, 0.14, 0.03, 0.004]
    params = SamplingParams(temperature=1.0, top_p=0.8)  # 0.61 < 0.8 <= 0.61 + 0.22: the first two
    torch.manual_seed(0)
    drawn, logp = sample_tokens(logits.repeat(4000, 1), params)
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - p[0] / (p[0] + p[1])) < 0.03
    assert torch.allclose(logp[drawn == 0], torch.log(p[0]))  # log-prob of the full tempered distribution


def test_inverse_cdf_draw_lands_on_a_drawable_token_at_both_ends(monkeypatch):
    """The sampler takes the first token whose cumulative probability reaches u * total, u = 1 - rand in (0, 1]:
    rand = 0 gives the last drawable token, rand just below 1 the first; tokens outside top-k (probability 0),
    before, between or after them, are never drawn, and the log-prob is the full tempered distribution's."""
    logits = torch.tensor([[-1.0, 3.0, -2.0, 2.0, 0.5, -4.0]])  # top-2: tokens 1 and 3
    params = SamplingParams(temperature=1.0, top_k=2)
    full = torch.log_softmax(logits, -1)[0]
    for rand, expected in [(0.0, 3), (1 - 2 ** -24, 1), (0.5, 1)]:  # p(1 | top-2) = 0.73 > 0.5
        monkeypatch.setattr(torch, "rand", lambda n, *a, value=rand, **k: torch.full((n,), value))
        drawn, logp = sample_tokens(logits, params)
        assert drawn.tolist() == [expected], rand
        assert logp.item() == full[expected].item()
    # the same at u's edges with every token drawable: the last and the first token
    for rand, expected in [(0.0, 5), (1 - 2 ** -24, 0)]:
        monkeypatch.setattr(torch, "rand", lambda n, *a, value=rand, **k: torch.full((n,), value))
        assert sample_tokens(logits, SamplingParams(temperature=1.0))[0].tolist() == [expected]


def test_per_sequence_eos_finished_rows_leave_and_early_exit(monkeypatch):
    """Sequences stop at their own EOS (pads after it); finished rows leave the batch; decoding stops at the end."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=8)
    eos, batch_sizes = tok.eos_token_id, []
    # Per original row: sequence 0 ends at step 1, sequences 2 and 3 at step 2, sequences 1, 4 and 5 at step 3.
    plan = iter([[5, 6, 7, 8, 9, 10], [eos, 6, 7, 8, 9, 10], [5, 6, eos, eos, 9, 10], [5, eos, 7, 8, eos, eos]])
    rows, finished = list(range(6)), set()

    def scripted(logits, params, groups=None):
        nonlocal rows
        if logits.shape[0] != len(rows):  # the engine dropped every row finished so far, keeping the order
            rows = [r for r in rows if r not in finished]
        batch_sizes.append(logits.shape[0])
        step = next(plan)
        finished.update(r for r in rows if step[r] == eos)
        return torch.tensor([step[r] for r in rows]), torch.zeros(len(rows))

    monkeypatch.setattr(engine, "sample_tokens", scripted)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))  # the prefill (transformers' forward)
    monkeypatch.setattr(engine.NativeDecoder, "step", lambda self, *a, f=engine.NativeDecoder.step: (
        forwards.append(1), f(self, *a))[1])  # the decode steps (the engine's own)
    ro = engine_generate(model, tok, _prompts(tok, 2), SamplingParams(n=3, max_new_tokens=50))
    assert len(forwards) == 4  # prefill + 3 decode steps, then every sequence has ended
    assert batch_sizes == [6, 6, 6, 3]  # 1 of 6 done: kept; 3 of 6 done (>= a quarter): dropped
    assert ro.completion_ids.shape[1] == 4
    assert ro.completion_mask.sum(1).tolist() == [2, 4, 3, 3, 4, 4]
    assert ro.completion_ids[0].tolist() == [5, eos, eos, eos]  # pad == eos after the end
    assert ro.completion_ids[1].tolist() == [6, 6, 6, eos] and ro.completion_ids[4].tolist() == [9, 9, 9, eos]
    assert not ro.truncated.any()


def test_bench_rollout_reports_both_backends_and_ratio():
    from minigrpo.tools.bench import bench_rollout

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=10)
    report = bench_rollout(model, tok, _prompts(tok, 2), n=2, max_new_tokens=4, reps=2, warmup=0)
    for name in ("engine", "hf"):
        r = report[name]
        assert 0 < r["min"] <= r["median_tokens_per_s"] <= r["max"]
    assert report["ratio_engine_over_hf"] == report["engine"]["median_tokens_per_s"] / report["hf"][
        "median_tokens_per_s"]
    # the matrix-work roofline of a decode step at 2 prompts x 2 rows, and each backend's fraction of it
    roof = report["roofline"]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert roof["rows"] == 4 and roof["flops_per_token"] == 2 * linear and roof["dtype"] == "float32"
    assert roof["kernel"] == "mm [in, out]"  # the kernel the engine's float32 step uses for a model this small
    assert roof["tokens_per_s"] == pytest.approx(4 / roof["step_s"])
    assert roof["gflops"] == pytest.approx(roof["tokens_per_s"] * roof["flops_per_token"] / 1e9)
    for name in ("engine", "hf"):
        assert report[name]["roofline_fraction"] == report[name]["median_tokens_per_s"] / roof["tokens_per_s"]
    bf16 = bench_rollout(model, tok, _prompts(tok, 2), n=2, max_new_tokens=4, reps=1, warmup=0,
                         weights_dtype="bfloat16")["roofline"]
    assert bf16["dtype"] == "bfloat16" and bf16["kernel"] == "linear"


def test_per_prompt_seeds_make_samples_independent_of_the_batch():
    tok = arith_tokenizer()
    model = arith_model(tok, seed=8, hidden=64, layers=2)
    prompts = _prompts(tok, 3)

    def run(ps, seeds):
        torch.manual_seed(999)  # the global stream must not matter
        return engine_generate(model, tok, ps, SamplingParams(n=4, max_new_tokens=12, seeds=seeds))

    together = run(prompts, [10, 11, 12])
    alone = run(prompts[1:2], [11])
    assert torch.equal(together.completion_ids[4:8, :alone.completion_ids.shape[1]], alone.completion_ids)
    assert together.completions[4:8] == alone.completions
    again = run(prompts, [10, 11, 12])
    assert torch.equal(again.completion_ids, together.completion_ids)
    other = run(prompts, [20, 21, 22])
    assert not torch.equal(other.completion_ids[:, :4], together.completion_ids[:, :4])


def test_cast_weights_restores_the_same_tensors_and_bf16_rollouts_report_their_mismatch():
    """rollout_dtype: the engine samples with a bfloat16 copy of the weights, then the float32 ones are back
    untouched (the same Parameter objects and tensors, bit for bit); the sampled log-probs are the bfloat16
    policy's, close to the trainer's float32 ones but not equal: what the sampler correction then weighs."""
    from minigrpo.model import cast_weights
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=5)
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}

    def accumulator(p):  # where DDP hangs its reduction hooks: resetting it would silently stop the all-reduce
        return p.expand_as(p).grad_fn.next_functions[0][0]

    accumulators = {name: accumulator(p) for name, p in model.named_parameters()}  # held: they stay alive
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    with cast_weights(model, "bfloat16"):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert {name: b.dtype for name, b in model.named_buffers()} == buffers  # rotary frequencies stay float32
    for name, p in model.named_parameters():
        param, data, value = before[name]
        assert p is param and p.data_ptr() == data and p.dtype == torch.float32 and torch.equal(p, value), name
        assert accumulator(p) is accumulators[name], name
    with cast_weights(model, None), cast_weights(model, "float32"):  # nothing to do
        assert all(p.data_ptr() == before[name][1] for name, p in model.named_parameters())

    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, weights_dtype="bfloat16")
    torch.manual_seed(0)
    ro = engine.generate(model, tok, _prompts(tok, 2), params)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attention = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, ids, attention, ro.completion_ids.shape[1], 1.0)
    gap = ((ro.logprobs - logp) * ro.completion_mask).abs().sum() / ro.completion_mask.sum()
    assert 1e-4 < gap < 0.05, gap  # float32 sampling agrees to ~1e-6 (test above); bfloat16 to ~1e-3


@pytest.mark.parametrize("engine_decode", ["auto", "hf"])
@pytest.mark.parametrize("broken", [float("nan"), float("inf"), 1e8])
def test_broken_weights_stop_the_generation_by_name(engine_decode, broken):
    """NaN or +inf logits draw garbage with a non-finite log-prob: the engine stops with NonFiniteError at that
    step, whichever decode step runs. Weights that blew up (every weight ~1e8, as after a learning rate of 1e8)
    overflow float32 in the activations: transformers' forward gives NaN logits, the engine's own prefill sees the
    overflow."""
    from minigrpo.errors import NonFiniteError

    tok = arith_tokenizer()
    model = arith_model(tok)
    with torch.no_grad():
        if broken == 1e8:
            for p in model.parameters():
                p.copy_(torch.where(torch.rand_like(p) < 0.5, -1e8, 1e8))
        else:
            model.lm_head.weight[5] = broken  # one token's logit: every row's distribution breaks
    with pytest.raises(NonFiniteError, match="while generating: its weights are broken"):
        engine_generate(model, tok, _prompts(tok, 2), SamplingParams(n=2, max_new_tokens=8, temperature=1.0,
                                                                     seeds=[1, 2], engine_decode=engine_decode))


def test_a_prompts_samples_do_not_depend_on_which_of_its_rows_have_left():
    """Each prompt's generator draws n numbers a step whatever rows are left (engine.prompt_uniforms, all steps at
    once): a prompt's numbers depend on its seed alone, are those its generator gives step by step, and a row
    samples the same token whether finished rows of its own or other prompts have left the batch or not."""
    from minigrpo.rollout.engine import prompt_uniforms

    u = prompt_uniforms([1, 2, 3], 4, 5, torch.device("cpu"))  # [steps, 3 prompts x n 4]
    assert u.shape == (5, 12) and bool((u > 0).all()) and bool((u <= 1).all())
    assert torch.equal(u[:, 4:8], prompt_uniforms([2], 4, 5, torch.device("cpu")))  # the batch does not matter
    g = torch.Generator().manual_seed(2)
    assert torch.equal(u[:, 4:8], torch.stack([1 - torch.rand(4, generator=g) for _ in range(5)]))
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(12, 50)
    full, _ = sample_tokens(logits, params, u[3])
    live = torch.tensor([1, 2, 3, 9, 11])  # prompt 1 has finished; prompts 0 and 2 have rows left
    drawn, _ = sample_tokens(logits[live], params, u[:, live][3])  # the engine keeps the live rows' columns
    assert torch.equal(drawn, full[live])


def test_the_native_path_runs_in_inference_mode_and_returns_ordinary_tensors(monkeypatch):
    """The engine's own step runs under torch.inference_mode (no autograd bookkeeping); what it returns is copied
    out of it: the trainer can save it for backward and change it in place, as with any backend's tensors."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    seen = []
    step = engine.NativeDecoder.step

    def recorded(self, *args):
        seen.append(torch.is_inference_mode_enabled())
        return step(self, *args)

    monkeypatch.setattr(engine.NativeDecoder, "step", recorded)
    ro = engine_generate(model, tok, ["12+30=", "7*8="], SamplingParams(n=2, max_new_tokens=6, temperature=1.0,
                                                                      seeds=[1, 2]))
    assert seen and all(seen)
    tensors = [v for v in vars(ro).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 6 and not any(t.is_inference() for t in tensors)
    w = torch.ones(1, requires_grad=True)
    (ro.logprobs * w).sum().backward()  # an inference tensor cannot be saved for backward
    ro.completion_mask.mul_(1.0)  # nor changed in place outside inference mode
    assert w.grad is not None
