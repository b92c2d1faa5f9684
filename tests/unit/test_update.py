"""`update_policy` on a tiny model (accumulation, old log-probs, clipping, learning direction), dynamic sampling
(`flat_groups`, `keep_informative`) and short end-to-end runs of every algorithm option."""

import copy
import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import minigrpo.train as train_mod
from minigrpo.algo import group_advantages
from minigrpo.config import Config
from minigrpo.logprobs import policy_logprobs
from minigrpo.model import Reference
from minigrpo.rollout.hf import hf_generate
from minigrpo.rollout.types import SamplingParams, make_rollout
from minigrpo.tasks import rewards
from minigrpo.tiny import tiny_model, tiny_tokenizer
from minigrpo.train import Scored, flat_groups, keep_informative, train, update_policy

TOK = tiny_tokenizer()
E = TOK.eos_token_id  # == pad id
G = 2
# 4 prompts x G = 2 completions, hand-built: left-padded prompts of different lengths, completions of
# different lengths (EOS at various places, pads == EOS after it, one truncated), C = 6.
PROMPTS = [[E, E, 10, 11, 12], [20, 21, 22, 23, 24], [E, 30, 31, 32, 33], [E, E, E, 40, 41]]
COMPLETIONS = [[50, 51, E, E, E, E],  # 3 tokens
               [52, 53, 54, 55, 56, 57],  # 6, truncated
               [60, E, E, E, E, E],  # 2
               [61, 62, 63, 64, E, E],  # 5
               [70, 71, 72, E, E, E],  # 4
               [E, E, E, E, E, E],  # 1
               [80, 81, 82, 83, 84, E],  # 6
               [85, 86, E, E, E, E]]  # 3
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, -0.3, 0.3])  # non-uniform


def hand_rollout():
    prompt_ids = torch.tensor(PROMPTS).repeat_interleave(G, 0)
    prompt_mask = (prompt_ids != E).long()
    return make_rollout(TOK, ["p0", "p1", "p2", "p3"], G, prompt_ids, prompt_mask, torch.tensor(COMPLETIONS), [E])


def small_model(seed: int = 0):
    return tiny_model(TOK, seed=seed, hidden=32, layers=1)


def sgd(model, lr: float):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def run_update(model, ro, loss_mask, micro: int, accumulation: int, lr: float = 0.1, **cfg_kw):
    """One update_policy call with plain SGD and a constant schedule; returns its statistics."""
    cfg = Config(use_peft=False, num_generations=G, per_device_train_batch_size=micro,
                 gradient_accumulation_steps=accumulation, max_completion_length=ro.completion_ids.shape[1],
                 max_grad_norm=0, **cfg_kw)
    ref = Reference(model, use_peft=False) if cfg.beta > 0 else None
    opt, sched = sgd(model, lr)
    return update_policy(model, ref, ro, ADVANTAGES, loss_mask, cfg, opt, sched)


def max_param_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_hand_rollout_masks():
    ro = hand_rollout()
    assert ro.completion_mask.sum(1).tolist() == [3, 6, 2, 5, 4, 1, 6, 3]
    assert ro.truncated.tolist() == [False, True] + [False] * 6


# ---- gradient accumulation: 1 micro-batch of 8 == 4 micro-batches of 2 -----------------------------------------

# micro-batches of 2 rows hold 3+6 = 9, 2+5 = 7, 4+1 = 5, 6+3 = 9 tokens: unequal, so bnpo must differ
@pytest.mark.parametrize("loss_type, kw, drop_truncated", [
    ("dapo", {}, False),
    ("dr_grpo", {}, False),
    ("grpo", {}, False),
    ("dapo", {"num_iterations": 2, "beta": 0.1}, False),  # old log-probs kept per micro-batch, KL term
    ("dr_grpo", {"num_iterations": 2, "epsilon_high": 0.28}, True),  # mask_truncated_completions
    ("grpo", {"num_iterations": 2, "importance_sampling_level": "sequence", "dual_clip": 3.0}, False),
    # issue 22: each surrogate and option that should not depend on the micro-batch split
    ("dapo", {"num_iterations": 2, "loss_mode": "cispo", "epsilon_high": 1.1}, False),
    ("grpo", {"num_iterations": 2, "loss_mode": "sapo"}, False),
    ("dapo", {"num_iterations": 2, "loss_mode": "vespo"}, True),
    ("luspo", {"num_iterations": 2, "importance_sampling_level": "sequence"}, False),
    ("dapo", {"num_iterations": 2, "epsilon_high": 0.28, "delta": 1.5}, False),
    ("dapo", {"num_iterations": 2, "beta": 0.1, "use_bias_correction_kl": True}, False),
    ("dr_grpo", {"num_iterations": 2, "entropy_coef": 0.05}, False),
    ("dapo", {"num_iterations": 2, "off_policy_mask_threshold": 0.0}, False),
])
def test_accumulation_equals_one_big_batch(loss_type, kw, drop_truncated):
    ro = hand_rollout()
    loss_mask = ro.completion_mask * ((~ro.truncated).float()[:, None] if drop_truncated else 1.0)
    start = small_model()
    big, small = copy.deepcopy(start), copy.deepcopy(start)
    stats_big = run_update(big, ro, loss_mask, micro=8, accumulation=1, loss_type=loss_type, **kw)
    stats_small = run_update(small, ro, loss_mask, micro=2, accumulation=4, loss_type=loss_type, **kw)
    assert max_param_diff(big, start) > 1e-3  # the update did something
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for key in ("train/loss", "train/clip_ratio", "train/kl", "train/ratio", "train/off_policy_masked"):
        assert stats_big.get(key) == pytest.approx(stats_small.get(key), abs=1e-6), key
    if kw.get("off_policy_mask_threshold") is not None:
        assert stats_big["train/off_policy_masked"] > 0  # the second pass drifted: some negative samples dropped
    if kw.get("num_iterations") == 2 and kw.get("loss_mode", "vanilla") == "vanilla":
        assert stats_big["train/clip_ratio"] > 0  # the second pass had ratios != 1 and some were clipped


def token_entropy(model, ro) -> torch.Tensor:
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    att = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    with torch.no_grad():
        return policy_logprobs(model, ids, att, ro.completion_ids.shape[1], 1.0)[1]


def test_top_entropy_selection_trains_only_the_selected_tokens():
    # dr_grpo's denominator ignores the mask, so selecting tokens by entropy must equal removing the others from
    # the loss mask by hand: same update, to the last bit of tolerance
    ro = hand_rollout()
    start = small_model()
    entropy = token_entropy(start, ro)
    valid = entropy[ro.completion_mask.bool()].sort().values
    threshold = torch.quantile(valid, 1 - 0.3)
    by_hand = ro.completion_mask * (entropy >= threshold).float()
    assert 0 < by_hand.sum() < ro.completion_mask.sum()  # a real selection: 30% of the 30 tokens
    selected, manual = copy.deepcopy(start), copy.deepcopy(start)
    stats = run_update(selected, ro, ro.completion_mask, micro=8, accumulation=1, loss_type="dr_grpo",
                       top_entropy_quantile=0.3)
    run_update(manual, ro, by_hand, micro=8, accumulation=1, loss_type="dr_grpo")
    assert max_param_diff(selected, start) > 1e-3
    for p, q in zip(selected.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert stats["train/entropy_kept"] == pytest.approx(by_hand.sum().item() / ro.completion_mask.sum().item())


def test_entropy_bonus_alone_raises_the_entropy():
    # zero advantages: the clipped surrogate gives no gradient, only the bonus moves the policy, toward more entropy
    ro = hand_rollout()
    model = small_model()
    before = (token_entropy(model, ro) * ro.completion_mask).sum()
    cfg = Config(use_peft=False, num_generations=G, per_device_train_batch_size=8, max_grad_norm=0,
                 max_completion_length=6, entropy_coef=1.0)
    opt, sched = sgd(model, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from reading the bonus (a tensor with a graph) for the logs
        stats = update_policy(model, None, ro, torch.zeros(8), ro.completion_mask, cfg, opt, sched)
    assert (token_entropy(model, ro) * ro.completion_mask).sum() > before + 1e-3
    assert stats["train/entropy_coef"] == stats["train/entropy_coef_applied"] == 1.0
    assert stats["train/loss"] == pytest.approx(-stats["train/entropy"], rel=1e-5)  # loss = -1 * mean entropy
    assert stats["train/policy_loss"] == pytest.approx(0.0, abs=1e-7)  # the surrogate alone: A = 0


def test_bnpo_is_per_micro_batch():
    ro = hand_rollout()
    start = small_model()
    bnpo_big, bnpo_small, dapo_big = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    run_update(bnpo_big, ro, ro.completion_mask, micro=8, accumulation=1, loss_type="bnpo")
    run_update(bnpo_small, ro, ro.completion_mask, micro=2, accumulation=4, loss_type="bnpo")
    run_update(dapo_big, ro, ro.completion_mask, micro=8, accumulation=1, loss_type="dapo")
    # one micro-batch: bnpo's micro-batch token mean IS dapo's batch token mean
    for p, q in zip(bnpo_big.parameters(), dapo_big.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # 4 micro-batches of 9, 7, 5, 9 tokens: each token weighs 1/(4 * n_micro) instead of 1/30
    assert max_param_diff(bnpo_big, bnpo_small) > 1e-3


# ---- a positive advantage raises the completion's log-prob ------------------------------------------------------


def sequence_logp(model, ro) -> torch.Tensor:
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    att = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, ids, att, ro.completion_ids.shape[1], 1.0)
    return (logp * ro.completion_mask).sum(1)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), loss_type=st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]))
def test_positive_advantage_raises_log_prob(seed, loss_type):
    model = small_model(seed)
    torch.manual_seed(seed)
    ro = hf_generate(model, TOK, ["1+2?"], SamplingParams(n=2, max_new_tokens=6))
    assume(ro.completions[0] != ro.completions[1])
    adv, _ = group_advantages(torch.tensor([1.0, 0.0]), torch.ones(2), 2)  # +-0.5 / (sqrt(0.5) + 1e-4)
    before = sequence_logp(model, ro)
    cfg = Config(use_peft=False, num_generations=2, per_device_train_batch_size=2, loss_type=loss_type,
                 max_grad_norm=0, max_completion_length=6)
    opt, sched = sgd(model, 0.01)
    update_policy(model, None, ro, adv, ro.completion_mask, cfg, opt, sched)
    after = sequence_logp(model, ro)
    assert after[0] > before[0]  # the rewarded completion became more likely
    assert after[0] - after[1] > before[0] - before[1]  # and more likely relative to the unrewarded one


# ---- num_iterations = 2: the stored old log-probs, and clipping -------------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    original = train_mod.policy_loss

    def recording(logp, old_logp, advantages, mask, *args, **kwargs):
        out = original(logp, old_logp, advantages, mask, *args, **kwargs)
        calls.append(dict(logp=logp.detach().clone(), old=old_logp.clone(), adv=advantages.clone(),
                          mask=mask.clone(), ratio=out.ratio.clone(), clipped=out.clipped.clone()))
        return out

    monkeypatch.setattr(train_mod, "policy_loss", recording)
    return calls


def test_second_iteration_uses_stored_old_log_probs_and_clips(recorded):
    ro = hand_rollout()
    stats = run_update(small_model(), ro, ro.completion_mask, micro=8, accumulation=1, lr=1.0,
                       num_iterations=2, epsilon=0.2, epsilon_high=0.28)
    assert len(recorded) == 2
    first, second = recorded
    m = first["mask"] > 0
    assert (first["ratio"][m] == 1).all()  # before any update the policy IS the sampler: ratio exactly 1
    assert torch.equal(second["old"], first["logp"])  # the old log-probs are the first pass's, not recomputed
    torch.testing.assert_close(second["ratio"][m], torch.exp(second["logp"] - first["logp"])[m])
    assert (second["ratio"][m] - 1).abs().min() > 0 and (second["ratio"][m] - 1).abs().max() > 0.1
    A = second["adv"][:, None].expand_as(second["ratio"])
    high, low = (second["ratio"] > 1.28) & (A > 0), (second["ratio"] < 0.8) & (A < 0)
    assert torch.equal(second["clipped"].bool(), high | low)
    assert (high & m).any() and (low & m).any()  # both sides of the clip engaged on real tokens
    # the other side of each bound does not clip: A < 0 above 1.28, A > 0 below 0.8 are not flagged
    assert (((second["ratio"] > 1.28) & (A < 0)) | ((second["ratio"] < 0.8) & (A > 0)))[m].any()
    assert (first["clipped"] == 0).all()
    # logged clip ratio: mean over both passes of the token fraction clipped (pass 1: 0)
    assert stats["train/clip_ratio"] == pytest.approx(second["clipped"][m].mean().item() / 2)


def test_old_log_probs_are_kept_per_micro_batch(recorded):
    ro = hand_rollout()
    run_update(small_model(), ro, ro.completion_mask, micro=2, accumulation=4, lr=1.0, num_iterations=2)
    assert len(recorded) == 8  # 2 passes x 4 micro-batches
    for j in range(4):
        assert (recorded[j]["ratio"] == 1).all()
        assert torch.equal(recorded[4 + j]["old"], recorded[j]["logp"])
        assert torch.equal(recorded[4 + j]["adv"], ADVANTAGES[2 * j:2 * j + 2])


# ---- dynamic sampling: flat_groups, keep_informative ------------------------------------------------------------


def test_flat_groups_by_hand():
    totals = [1.0, 1.0,  # equal: flat
              0.0, 1.0,  # informative
              None, 1.0,  # one scored reward: flat
              None, None,  # none: flat
              0.5, 0.5]  # flat
    assert flat_groups(totals, 2) == [True, False, True, True, True]
    assert flat_groups([0.0, 0.0, 1e-9, 2.0, 2.0, 2.0], 3) == [False, True]


def scored(prompt_width, completions, totals, generate_s):
    n = len(completions) // G
    prompt_ids = torch.arange(100, 100 + n * prompt_width).view(n, prompt_width).repeat_interleave(G, 0)
    ro = make_rollout(TOK, [f"q{prompt_width}-{i}" for i in range(n)], G, prompt_ids, torch.ones_like(prompt_ids),
                      torch.tensor(completions), [E])
    return Scored(ro, {"answer": [f"a{prompt_width}-{i // G}" for i in range(2 * n)]}, totals,
                  {"fn": [None if t is None else t * 10 for t in totals]}, generate_s, generate_s / 10)


def test_keep_informative_merges_and_prefers_informative_groups():
    # part A: prompts of 3 tokens, completions of 4; groups: flat [1, 1], informative [0, 1]
    part_a = scored(3, [[65, E, E, E], [66, E, E, E], [67, 68, 69, 70], [71, E, E, E]], [1.0, 1.0, 0.0, 1.0], 1.0)
    # part B: prompts of 5 tokens, completions of 2; groups: flat [None, 0.5], informative [2, 3]
    part_b = scored(5, [[72, E], [73, 74], [75, E], [76, E]], [None, 0.5, 2.0, 3.0], 2.0)
    out = keep_informative([part_a, part_b], num_groups=2, G=G, pad_id=E)
    # merged groups 0 (A flat), 1 (A informative), 2 (B flat), 3 (B informative): keep 1 and 3 -> rows 2, 3, 6, 7
    assert out.totals == [0.0, 1.0, 2.0, 3.0]
    assert out.rollout.prompts == ["q3-1"] * 2 + ["q5-1"] * 2  # groups 1 (A's second) and 3 (B's second)
    assert out.columns == {"answer": ["a3-1", "a3-1", "a5-1", "a5-1"]}
    assert out.per_func == {"fn": [0.0, 10.0, 20.0, 30.0]}
    assert out.generate_s == 3.0 and out.score_s == pytest.approx(0.3)
    ro = out.rollout
    assert ro.completions == [TOK.decode([67, 68, 69, 70]), TOK.decode([71]), TOK.decode([75]), TOK.decode([76])]
    # completions re-padded on the right to width 4 (pad = E, masked out), prompts on the left to width 5
    assert ro.completion_ids.tolist() == [[67, 68, 69, 70], [71, E, E, E], [75, E, E, E], [76, E, E, E]]
    assert ro.completion_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert ro.truncated.tolist() == [True, False, False, False]
    assert ro.prompt_ids.tolist() == [[E, E, 103, 104, 105]] * 2 + [[105, 106, 107, 108, 109]] * 2
    assert ro.prompt_mask.tolist() == [[0, 0, 1, 1, 1]] * 2 + [[1, 1, 1, 1, 1]] * 2
    # not enough informative groups: the flat ones fill up, in order (group 0 before group 2)
    out3 = keep_informative([part_a, part_b], num_groups=3, G=G, pad_id=E)
    assert out3.rollout.prompts == ["q3-0"] * 2 + ["q3-1"] * 2 + ["q5-1"] * 2  # groups 0, 1, 3
    assert out3.totals == [1.0, 1.0, 0.0, 1.0, 2.0, 3.0]


def test_keep_informative_keeps_sampler_log_probs():
    part_a = scored(3, [[65, E, E, E], [66, E, E, E], [67, 68, 69, 70], [71, E, E, E]], [1.0, 1.0, 0.0, 1.0], 1.0)
    part_b = scored(5, [[72, E], [73, 74], [75, E], [76, E]], [None, 0.5, 2.0, 3.0], 2.0)
    for k, part in enumerate((part_a, part_b)):  # as engine_generate returns them: 0 after the mask
        part.rollout.logprobs = -(torch.arange(part.rollout.completion_mask.numel()).view_as(
            part.rollout.completion_mask) + 10.0 * k + 1) * part.rollout.completion_mask
    out = keep_informative([part_a, part_b], num_groups=2, G=G, pad_id=E)
    # rows 2, 3 of A (width 4) and rows 2, 3 of B (width 2, padded with 0 to 4)
    assert out.rollout.logprobs is not None
    assert out.rollout.logprobs.tolist() == [[-9, -10, -11, -12], [-13, -14, 0, 0], [-15, -16, 0, 0],
                                             [-17, -18, 0, 0]]


# ---- end-to-end runs ------------------------------------------------------------------------------------------


def parity_reward(prompts, completions, answer, **kwargs):
    """Deterministic, model-independent: the group of a problem with an odd `a` (answer 2a+1 = 3 mod 4) gets
    rewards [0, 1, 0, 1] (informative); any other group gets [0, 0, 0, 0] (flat)."""
    return [float(i % 2) if int(a) % 4 == 3 else 0.0 for i, a in enumerate(answer)]


@pytest.fixture
def run_cfg(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARD_FUNCS, "parity", parity_reward)
    threads = torch.get_num_threads()
    # num_threads=1: the token-by-token decode of a tiny model gains nothing from threads and, on a busy
    # 2-core box, 2 OpenMP threads made this file 40x slower; train() sets it globally, so it is restored after.
    yield dict(model="tiny-random", dataset=str(tiny_data), reward_funcs=["parity"], num_generations=4,
               per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=8,
               learning_rate=1e-2, eval_limit=0, seed=0, num_threads=1, output_dir=str(tmp_path / "run"))
    torch.set_num_threads(threads)


def step_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/reward" in r]


def test_dynamic_sampling_end_to_end(run_cfg):
    run = train(Config(**run_cfg, dynamic_sampling=True, max_sampling_tries=3, max_steps=5), show_progress=False)
    rows = step_rows(run)
    # 2 prompts per step; the data order of seed 0 (PromptSampler(20, 0)) is 4 5 13 19 7 14 3 6 9 17 11 2 16 18 10
    # 12 15 ..., and a problem is informative iff its `a` (= its index) is odd:
    #   step 1: [4, 5] -> 1 informative; +[13] -> 2                   tries 2, informative 2
    #   step 2: [19, 7] -> 2                                          tries 1, informative 2
    #   step 3: [14, 3] -> 1; +[6] -> 1; +[9] -> 2                    tries 3, informative 2
    #   step 4: [17, 11] -> 2                                         tries 1, informative 2
    #   step 5: [2, 16] -> 0; +[18, 10] -> 0; +[12, 15] -> 1          tries 3 (the bound), informative 1
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["train/sampling_tries"] for r in rows] == [2, 1, 3, 1, 3]
    assert [r["train/informative_groups"] for r in rows] == [2, 2, 2, 2, 1]
    # the kept batch: informative groups first (reward mean 1/2), then flat ones (0): step 5 keeps [2] and [15]
    assert [r["train/frac_reward_zero_std"] for r in rows] == [0, 0, 0, 0, 0.5]
    assert [r["train/reward"] for r in rows] == [0.5, 0.5, 0.5, 0.5, 0.25]
    assert all(math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in rows)


def test_without_dynamic_sampling_one_try(run_cfg):
    rows = step_rows(train(Config(**run_cfg, max_steps=2), show_progress=False))
    # step 1: [4, 5] (4 flat), step 2: [13, 19]; no resampling
    assert [r["train/sampling_tries"] for r in rows] == [1, 1]
    assert [r["train/informative_groups"] for r in rows] == [1, 2]
    assert [r["train/frac_reward_zero_std"] for r in rows] == [0.5, 0]


@pytest.mark.parametrize("options", [
    {"importance_sampling_level": "sequence"},
    {"dual_clip": 3.0},
    {"drop_zero_std_groups": True},
    {"epsilon_high": 0.28},
    {"loss_type": "grpo"},
    {"loss_type": "bnpo"},
    {"loss_type": "dr_grpo", "scale_rewards": "none"},
    {"loss_type": "dapo", "scale_rewards": "batch", "std_floor": 0.1},
    {"loss_type": "cispo", "epsilon_high": 5.0},  # TRL's name: loss_mode cispo, dapo aggregation
    {"loss_type": "sapo"},
    {"loss_type": "vespo"},
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"delta": 1.5, "use_bias_correction_kl": True, "off_policy_mask_threshold": 0.1},
    {"top_entropy_quantile": 0.2, "use_adaptive_entropy": True, "entropy_target": 10.0, "entropy_coef": 0.01},
    {"adv_estimator": "rloo"},
    {"adv_estimator": "reinforce_plus_plus"},
    {"adv_estimator": "reinforce_plus_plus_baseline"},
    {"adv_estimator": "grpo_passk"},
    {"multi_objective_aggregation": "normalize_then_sum"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_algorithm_options_end_to_end(run_cfg, options):
    run = train(Config(**run_cfg, use_peft=False, max_steps=2, num_iterations=2, beta=0.05, **options),
                show_progress=False)
    rows = step_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("train/loss", "train/grad_norm", "train/kl", "train/clip_ratio", "train/entropy"):
            assert math.isfinite(r[key]), key
        assert r["train/skipped_updates"] == 0
        # grpo_passk moves only groups with a single best sample: these binary-reward groups may have none
        assert r["train/grad_norm"] > 0 or options.get("adv_estimator") == "grpo_passk"
    # the policy moved off the reference during step 1
    assert rows[1]["train/kl"] > 0 or options.get("adv_estimator") == "grpo_passk"
    assert (run / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("micro", [2, 8])  # whole groups (a shared-prompt layout) and every row at once
def test_tool_tokens_never_reach_the_loss(micro):
    """A multi-turn rollout's tokens from tools (`tool_mask`) are context, never a target: changing the id of one
    that nothing attends to (the last token of a row) leaves the update bit for bit the same, KL term included;
    without the tool mask the same change moves it (the test can fail)."""
    def updated(token: int, tool: bool):
        ro = hand_rollout()
        ro.completion_ids[1, 5] = token  # row 1's last token (it is truncated: nothing follows it)
        if tool:
            ro.tool_mask = torch.zeros_like(ro.completion_mask)
            ro.tool_mask[1, 5] = 1.0
        model = small_model(3)
        run_update(model, ro, ro.generated_mask, micro, 8 // micro, beta=0.04)
        return model

    assert max_param_diff(updated(57, tool=True), updated(99, tool=True)) == 0.0
    assert max_param_diff(updated(57, tool=False), updated(99, tool=False)) > 0.0


def test_the_no_signal_warning_names_grpo_passk_ties():
    # two groups of 4, each with its best reward tied (two 1s): pass@k's margin is 0 everywhere, though the rewards
    # differ within each group
    totals = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    adv, zero_std = group_advantages(torch.tensor(totals), torch.ones(8), 4, estimator="grpo_passk")
    assert adv.tolist() == [0.0] * 8 and zero_std.tolist() == [False, False]
    scored = Scored(hand_rollout(), {}, totals, {}, 0.0, 0.0)
    guard = rewards.RewardGuard(10.0, 3)
    said = train_mod.no_signal_cause(5, scored, guard, "grpo_passk", 4)
    assert said.startswith("no learning signal for 5 steps in a row: adv_estimator grpo_passk gives a group's best")
    assert "every group's best reward is tied" in said
    # the same rewards under grpo would move (the run would not warn); a flat batch keeps the generic cause
    assert "within each group the rewards are equal" in train_mod.no_signal_cause(
        5, Scored(hand_rollout(), {}, [1.0] * 4 + [0.0] * 4, {}, 0.0, 0.0), guard, "grpo_passk", 4)


def test_the_update_trains_a_peft_model_whose_inner_model_was_left_in_eval_mode():
    """peft wraps a freshly loaded model (eval mode) in modules of its own in train mode: update_policy checks the
    model inside too, so dropout and activation checkpointing see training mode in every layer."""
    from peft import LoraConfig, get_peft_model

    from minigrpo.compat import peft_wrapping, unwrap_model

    with peft_wrapping():
        model = get_peft_model(small_model().eval(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert model.training and not unwrap_model(model).training  # what peft leaves
    cfg = Config(use_peft=True, num_generations=G, per_device_train_batch_size=8, max_completion_length=6, beta=0.0,
                 logprob_chunk_size=0)  # (the split head check would switch modes itself)
    opt, sched = sgd(model, 0.1)
    ro = hand_rollout()
    update_policy(model, None, ro, ADVANTAGES, ro.completion_mask, cfg, opt, sched)
    assert all(m.training for m in model.modules())
