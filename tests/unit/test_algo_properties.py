"""Property tests (hypothesis) of the GRPO math: centred advantages, k3 >= 0, padding never matters."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrpo.algo import LOSS_TYPES, Norm, group_advantages, high_entropy_mask, kl_k3, policy_loss

SETTINGS = settings(max_examples=60, deadline=None)

# Rewards: small integers (so ties and flat groups are common) mixed with arbitrary floats.
reward = st.one_of(st.integers(-3, 3).map(float), st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False))


@st.composite
def grouped_rewards(draw):
    G = draw(st.integers(2, 8))
    P = draw(st.integers(1, 4))
    return G, draw(st.lists(reward, min_size=G * P, max_size=G * P))


@SETTINGS
@given(grouped_rewards(), st.sampled_from(["group", "batch", "none"]), st.sampled_from([0.0, 0.1, 10.0]))
def test_group_advantages_have_zero_mean_per_group(case, scale, std_floor):
    G, values = case
    rewards = torch.tensor(values, dtype=torch.float64)
    adv, zero_std = group_advantages(rewards, torch.ones(len(values)), G, scale, std_floor=std_floor)
    per_group = adv.view(-1, G)
    assert per_group.mean(1).abs().max().item() <= 1e-9 * max(1.0, per_group.abs().max().item())
    # flagged exactly when a group's rewards are all equal; a flagged group's advantages are exactly 0
    flat = [len(set(values[i:i + G])) == 1 for i in range(0, len(values), G)]
    assert zero_std.tolist() == flat
    assert (per_group[zero_std] == 0).all()
    if scale == "group":  # divided by max(std, floor) + 1e-4: the advantages' std is below 1
        assert (per_group.std(1) < 1.0).all()


log_prob = st.floats(-30.0, 0.0, allow_nan=False, width=32)


@SETTINGS
@given(st.lists(st.tuples(log_prob, log_prob), min_size=1, max_size=64), st.sampled_from([torch.float32,
                                                                                          torch.float64]))
def test_k3_is_non_negative_and_zero_on_equal_log_probs(pairs, dtype):
    logp = torch.tensor([p for p, _ in pairs], dtype=dtype)
    ref = torch.tensor([r for _, r in pairs], dtype=dtype)
    k3 = kl_k3(logp, ref)
    assert (kl_k3(logp, logp) == 0).all()  # the same policy: exactly 0
    # exp(d) - d - 1 >= 0 mathematically; computed, it may round to one ulp of 1 below 0 when d ~ 0
    # (see test_k3_tiny_difference_is_not_negative below), never more
    ulp_of_one = torch.finfo(dtype).eps
    assert (k3 >= -2 * ulp_of_one).all()
    assert (k3[(ref - logp).abs() >= 1e-2] >= 0).all()  # away from the cancellation: exactly >= 0


def test_k3_tiny_difference_is_not_negative():
    k3 = kl_k3(torch.tensor([0.0]), torch.tensor([5e-5]))  # d = ref - logp = 5e-5
    assert k3.item() >= 0
    assert k3.item() == pytest.approx(5e-5**2 / 2, rel=1e-2)  # k3 = d^2/2 + O(d^3)


@st.composite
def padded_batch(draw):
    """Log-probs [B, T] with a mask, plus other values for the masked-out positions only."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    grid = st.lists(log_prob, min_size=B * T, max_size=B * T).map(lambda v: torch.tensor(v).view(B, T))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T).float()
    adv = torch.tensor(draw(st.lists(st.floats(-3, 3, width=32), min_size=B, max_size=B)))
    return dict(logp=draw(grid), old=draw(grid), ref=draw(grid), mask=mask, adv=adv,
                other=dict(logp=draw(grid), old=draw(grid), ref=draw(grid)))


@SETTINGS
@given(padded_batch(), st.sampled_from(["token", "sequence"]), st.sampled_from([None, 3.0]),
       st.sampled_from([0.0, 0.1]))
def test_loss_ignores_masked_positions(case, level, dual_clip, beta):
    mask = case["mask"]
    norm = Norm(num_sequences=mask.shape[0], num_tokens=int(mask.sum()), num_micro_batches=2,
                max_completion_length=mask.shape[1] + 1)

    def losses(logp, old, ref):
        out = policy_loss(logp, old, case["adv"], mask, epsilon=0.2, epsilon_high=0.28, beta=beta, ref_logp=ref,
                          level=level, dual_clip=dual_clip)
        return {name: agg(out.per_token, mask, norm) for name, agg in LOSS_TYPES.items()}, out

    base, out = losses(case["logp"], case["old"], case["ref"])
    keep = mask > 0
    moved = {k: torch.where(keep, case[k], case["other"][k]) for k in ("logp", "old", "ref")}
    again, _ = losses(moved["logp"], moved["old"], moved["ref"])
    for name in LOSS_TYPES:
        assert torch.isfinite(base[name])
        assert torch.equal(base[name], again[name]), name
    # the aggregators alone: any per-token value at a masked position is ignored
    noise = torch.where(keep, out.per_token, case["other"]["logp"] * 1e3)
    for name, agg in LOSS_TYPES.items():
        assert torch.equal(agg(noise, mask, norm), base[name]), name


@SETTINGS
@given(grouped_rewards(), st.data())
def test_rloo_advantages_are_leave_one_out(case, data):
    G, values = case
    valid = data.draw(st.lists(st.sampled_from([1.0, 1.0, 1.0, 0.0]), min_size=len(values), max_size=len(values)))
    rewards, v = torch.tensor(values, dtype=torch.float64), torch.tensor(valid, dtype=torch.float64)
    adv, zero_std = group_advantages(rewards, v, G, estimator="rloo")
    for g in range(len(values) // G):
        idx = [i for i in range(g * G, (g + 1) * G) if valid[i]]
        scale = max([1.0] + [abs(values[i]) for i in idx])
        assert abs(sum(adv[i].item() for i in idx)) <= 1e-9 * scale * G  # zero-sum over the group's valid samples
        for i in range(g * G, (g + 1) * G):
            if not valid[i] or len(idx) < 2 or zero_std[g]:
                assert adv[i].item() == 0.0  # skipped, alone (no other sample), or a flat group: exactly 0
            else:  # r_i minus the mean of the others
                others = [values[j] for j in idx if j != i]
                assert adv[i].item() == pytest.approx(values[i] - sum(others) / len(others), rel=1e-9, abs=1e-9 * scale)


@SETTINGS
@given(st.lists(st.tuples(st.floats(0.0, 12.0, allow_nan=False), st.booleans()), min_size=1, max_size=80),
       st.sampled_from([0.0, 0.05, 0.2, 0.37, 0.5, 0.8, 1.0]))
def test_entropy_selection_keeps_exactly_the_top_quantile(tokens, rho):
    entropy = torch.tensor([e for e, _ in tokens], dtype=torch.float64)[None]
    mask = torch.tensor([float(m) for _, m in tokens], dtype=torch.float64)[None]
    kept = high_entropy_mask(entropy, mask, rho)
    assert (kept <= mask).all()  # never a masked token
    valid = sorted(entropy[mask.bool()].tolist(), reverse=True)
    if not valid:
        assert kept.sum() == 0
        return
    n = len(valid)
    # the (1 - rho) quantile sits at position p = (1 - rho)(n - 1) of the ascending order: n - ceil(p) tokens are
    # above it (p an integer: the token at p itself is kept, as TRL's >=)
    k = n - math.ceil((1 - rho) * (n - 1) - 1e-9)
    chosen = sorted(entropy[kept.bool()].tolist(), reverse=True)
    assert chosen[:k] == valid[:k]  # the k highest are all kept ...
    assert all(e == valid[k - 1] for e in chosen[k:])  # ... and nothing lower, except ties with the k-th
    assert len(chosen) >= 1 and (rho < 1 or len(chosen) == n)


@SETTINGS
@given(st.lists(log_prob, min_size=1, max_size=32), st.lists(log_prob, min_size=32, max_size=32))
def test_unbiased_kl_is_zero_when_the_policies_agree(logps, olds):
    logp = torch.tensor(logps, dtype=torch.float64)[None]
    old = torch.tensor(olds[:len(logps)], dtype=torch.float64)[None]
    mask = torch.ones_like(logp)
    out = policy_loss(logp, old, torch.zeros(1, dtype=torch.float64), mask, epsilon=0.2, beta=0.1, ref_logp=logp,
                      unbiased_kl=True)
    assert out.kl.abs().max().item() == 0.0  # pi_theta == pi_ref: k3 is 0, whatever the ratio to pi_old
    moved = policy_loss(logp, old, torch.zeros(1, dtype=torch.float64), mask, epsilon=0.2, beta=0.1,
                        ref_logp=logp - 0.5, unbiased_kl=True)
    assert (moved.kl > 0).all()  # and positive when they differ (k3 > 0, ratio > 0)
