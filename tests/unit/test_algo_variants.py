"""Every loss variant and advantage mode on ONE worked example, with the expected values computed by hand.

The example: 2 prompts x G = 3 completions of length C = 4 from the tiny tokenizer, where pad == eos (E).

    row  completion ids      mask        truncated  reward  group
    c0   a  b  E  E          1 1 1 0     no         2       0    EOS mid-sequence, then a pad that is also E
    c1   a  b  c  d          1 1 1 1     yes        0       0    no EOS at all: every token kept
    c2   E  E  E  E          1 0 0 0     no         1       0    EOS first: only it
    c3   c  E  E  E          1 1 0 0     no         1       1
    c4   a  a  a  E          1 1 1 1     no         1       1    EOS in the last slot: not truncated
    c5   d  d  E  E          1 1 1 0     no         1       1
                                                                 active tokens 3+4+1+2+4+3 = 17

Group 0 rewards [2, 0, 1]: mean 1, unbiased std sqrt((1 + 1 + 0) / 2) = 1.
Group 1 rewards [1, 1, 1]: zero variance -> advantages exactly 0, flagged.

Made-up importance ratios (logp = old_logp + ln r), epsilon = 0.2, epsilon_high = 0.28 unless stated:

    c0 (A = +a): 1.25 (inside), 1.5 (> 1.28: clipped), 0.5 (A > 0: the low clip does not bind), 7.0 (masked pad)
    c1 (A = -a): 0.7 (< 0.8: clipped), 0.9 (inside), 1.5 (A < 0: the high clip does not bind), 5.0 (dual-clip case)
    c2 (A = 0):  2.0, then masked 9.0s;   c3..c5 (A = 0): 1.0

with a = 1 / (1 + 1e-4) = 1 / 1.0001, the group-scaled advantage of a +-1 deviation.
"""

import math

import pytest
import torch

from minigrpo.algo import LOSS_TYPES, Norm, completion_mask, group_advantages, kl_k3, policy_loss
from minigrpo.rollout.types import make_rollout
from minigrpo.tasks.rewards import load_reward, soft_overlong_punishment
from minigrpo.tiny import tiny_tokenizer

G, C = 3, 4
A = 1 / 1.0001  # group-scaled advantage of a deviation of +-1 from the group mean (std 1, eps 1e-4)
EPS, EPS_HIGH = 0.2, 0.28
RATIOS = [[1.25, 1.5, 0.5, 7.0],
          [0.7, 0.9, 1.5, 5.0],
          [2.0, 9.0, 9.0, 9.0],
          [1.0, 1.0, 1.0, 1.0],
          [1.0, 1.0, 1.0, 1.0],
          [1.0, 1.0, 1.0, 1.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
REWARDS = [2.0, 0.0, 1.0, 1.0, 1.0, 1.0]

# Masked-in per-token losses (epsilon_high = 0.28), L = -min(r * A, clip(r, 0.8, 1.28) * A):
#   c0, A = +a: -1.25a, -1.28a (clipped), -0.5a               sum -3.03a (3 tokens)
#   c1, A = -a: +0.8a (clipped), +0.9a, +1.5a, +5.0a           sum +8.2a  (4 tokens)
#   c2..c5, A = 0: 0                                         total S = 5.17a over 17 tokens, 6 sequences
S = 5.17 * A


def close(actual: torch.Tensor, expected, where=None) -> None:
    """Equal to the hand-computed values up to float64 rounding (only at positions `where` is 1, if given:
    what a masked-out position holds is unspecified, the loss never reads it)."""
    expected = torch.tensor(expected, dtype=actual.dtype)
    if where is not None:
        actual, expected = actual * where, expected * where
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


def _ids(tok, text: str, eos: int) -> list[int]:
    ids = tok(text, add_special_tokens=False).input_ids
    return ids + [eos] * (C - len(ids))


@pytest.fixture(scope="module")
def example():
    tok = tiny_tokenizer()
    E = tok.eos_token_id
    assert tok.pad_token_id == E  # the case that breaks `!= pad_id` masks
    texts = ["ab", "abcd", "", "c", "aaa", "dd"]
    completion_ids = torch.tensor([_ids(tok, t, E) for t in texts])
    prompt_ids = torch.tensor([[10, 11], [12, 13]]).repeat_interleave(G, 0)
    ro = make_rollout(tok, ["p0", "p1"], G, prompt_ids, torch.ones_like(prompt_ids), completion_ids, [E])
    old = -torch.arange(1, 25, dtype=torch.float64).view(6, 4) / 7  # arbitrary old log-probs: only ratios matter
    logp = old + torch.tensor(RATIOS, dtype=torch.float64).log()
    adv, zero_std = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.ones(6), G, "group")
    return dict(tok=tok, E=E, ro=ro, ids=completion_ids, mask=ro.completion_mask.double(), old=old, logp=logp,
                adv=adv, zero_std=zero_std, texts=texts)


# ---- masks: first EOS kept, pads (== eos) dropped, truncated completions --------------------------------------


def test_example_mask_pad_equals_eos_and_truncation(example):
    ro = example["ro"]
    assert ro.completion_mask.tolist() == MASK
    assert completion_mask(example["ids"], [example["E"]]).tolist() == MASK
    # c0 = [a, b, E, E]: the first E (position 2) is kept, the pad E at position 3 is dropped
    assert example["ids"][0, 2] == example["ids"][0, 3] == example["E"] and MASK[0][2:] == [1, 0]
    assert ro.truncated.tolist() == [False, True, False, False, False, False]  # only c1 has no EOS
    assert ro.completions == example["texts"]  # decoded up to the EOS, pads and EOS removed
    assert ro.prompts == ["p0"] * 3 + ["p1"] * 3  # the n samples of prompt i are rows i*n .. i*n + n - 1
    # mask_truncated_completions (train.py): loss_mask = completion_mask * ~truncated -> c1 leaves the loss
    masked = ro.completion_mask * (~ro.truncated).float()[:, None]
    assert masked.sum().item() == 17 - 4
    assert masked[1].tolist() == [0, 0, 0, 0] and masked[0].tolist() == MASK[0]


# ---- advantages: group / batch / none, std_floor, zero-variance group -------------------------------------------


@pytest.mark.parametrize("scale, std_floor, expected_a", [
    ("group", 0.0, 1 / 1.0001),  # group 0: std 1 -> +-1 / (1 + 1e-4)
    ("group", 0.5, 1 / 1.0001),  # floor below the std: max(1, 0.5) = 1, no effect
    ("group", 2.0, 1 / 2.0001),  # floor above the std: max(1, 2) + 1e-4
    # batch: mean of [2,0,1,1,1,1] is 1, squared deviations sum to 2, unbiased var 2/5 = 0.4
    ("batch", 0.0, 1 / (math.sqrt(0.4) + 1e-4)),
    ("batch", 1.0, 1 / 1.0001),  # max(sqrt(0.4) = 0.632, 1) = 1
    ("none", 0.0, 1.0),  # no division (Dr. GRPO): r - mean
    ("none", 2.0, 1.0),  # the floor only bounds a divisor; "none" has none
])
def test_example_advantages(example, scale, std_floor, expected_a):
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    adv, zero_std = group_advantages(rewards, torch.ones(6), G, scale, std_floor=std_floor)
    assert adv.tolist() == pytest.approx([expected_a, -expected_a, 0, 0, 0, 0], rel=1e-12)
    assert adv[2:].tolist() == [0.0] * 4  # exactly 0: c2 sits at its group's mean, group 1 has no variance
    assert zero_std.tolist() == [False, True]


def test_zero_variance_group_is_exactly_zero_for_inexact_floats():
    # 0.1 is not a binary fraction: the fp mean of [0.1, 0.1, 0.1] is not exactly 0.1, yet the group is flat
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.3])
    for scale in ("group", "batch", "none"):
        adv, zero_std = group_advantages(rewards, torch.ones(6), 3, scale)
        assert adv.tolist() == [0.0] * 6 and zero_std.tolist() == [True, True]


def test_std_floor_shrinks_near_ties():
    # rewards [0, 0.01, 0.02]: mean 0.01, unbiased std sqrt((1e-4 + 0 + 1e-4) / 2) = 0.01
    rewards = torch.tensor([0.0, 0.01, 0.02], dtype=torch.float64)
    adv, _ = group_advantages(rewards, torch.ones(3), 3, "group")
    assert adv.tolist() == pytest.approx([-0.01 / 0.0101, 0.0, 0.01 / 0.0101])  # ~ +-0.99: a full-size advantage
    adv, _ = group_advantages(rewards, torch.ones(3), 3, "group", std_floor=0.1)
    assert adv.tolist() == pytest.approx([-0.01 / 0.1001, 0.0, 0.01 / 0.1001])  # ~ +-0.0999


# ---- the clipped surrogate, per token ---------------------------------------------------------------------------


def test_example_per_token_loss_clip_higher(example):
    assert example["adv"].tolist() == pytest.approx([A, -A, 0, 0, 0, 0], rel=1e-12)
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"],
                      epsilon=EPS, epsilon_high=EPS_HIGH)
    m = example["mask"]
    close(out.ratio, RATIOS, m)
    expected = [[-1.25 * A, -1.28 * A, -0.5 * A, 0.0],  # position 3 of c0 is a pad: masked out
                [0.8 * A, 0.9 * A, 1.5 * A, 5.0 * A]] + [[0.0] * 4] * 4
    close(out.per_token, expected, m)
    assert (out.clipped * m).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]] + [[0] * 4] * 4
    assert out.kl is None


def test_example_symmetric_clip(example):
    # epsilon_high = epsilon = 0.2: the 1.25 of c0 is now clipped to 1.2 as well; c1 unchanged
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"], epsilon=EPS, epsilon_high=EPS)
    m = example["mask"]
    close(out.per_token[:2], [[-1.2 * A, -1.2 * A, -0.5 * A, 0.0], [0.8 * A, 0.9 * A, 1.5 * A, 5.0 * A]], m[:2])
    assert (out.clipped * m)[0].tolist() == [1, 1, 0, 0]
    # dapo: (-1.2 - 1.2 - 0.5 + 8.2) a / 17 = 5.3a / 17
    norm = Norm(num_sequences=6, num_tokens=17, num_micro_batches=1, max_completion_length=C)
    assert LOSS_TYPES["dapo"](out.per_token, example["mask"], norm).item() == pytest.approx(5.3 * A / 17, rel=1e-12)


def test_example_gradients_vanish_exactly_where_clipped(example):
    logp = example["logp"].clone().requires_grad_(True)
    out = policy_loss(logp, example["old"], example["adv"], example["mask"], epsilon=EPS, epsilon_high=EPS_HIGH)
    (out.per_token * example["mask"]).sum().backward()
    # d/dlogp of -r*A is -r*A (r = exp(logp - old)); a clipped token has gradient 0
    assert logp.grad[0].tolist() == pytest.approx([-1.25 * A, 0.0, -0.5 * A, 0.0], rel=1e-12)
    assert logp.grad[1].tolist() == pytest.approx([0.0, 0.9 * A, 1.5 * A, 5.0 * A], rel=1e-12)
    active = (example["mask"] > 0) & (example["adv"][:, None] != 0)
    assert torch.equal((logp.grad == 0) & active, (out.clipped > 0) & active)


def test_example_dual_clip(example):
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"],
                      epsilon=EPS, epsilon_high=EPS_HIGH, dual_clip=3.0)
    # A < 0, ratio 5: min(-min(5 * -a, 1.28 * -a), -3 * -a) = min(5a, 3a) = 3a; ratio 1.5 < 3 is untouched
    close(out.per_token[1], [0.8 * A, 0.9 * A, 1.5 * A, 3.0 * A])
    # A > 0 rows are never touched by the dual clip
    close(out.per_token[0], [-1.25 * A, -1.28 * A, -0.5 * A, 0.0], example["mask"][0])
    norm = Norm(num_sequences=6, num_tokens=17, num_micro_batches=1, max_completion_length=C)
    # dapo: (-3.03 + 0.8 + 0.9 + 1.5 + 3.0) a / 17 = 3.17a / 17
    assert LOSS_TYPES["dapo"](out.per_token, example["mask"], norm).item() == pytest.approx(3.17 * A / 17, rel=1e-12)
    logp = example["logp"].clone().requires_grad_(True)
    out = policy_loss(logp, example["old"], example["adv"], example["mask"],
                      epsilon=EPS, epsilon_high=EPS_HIGH, dual_clip=3.0)
    (out.per_token * example["mask"]).sum().backward()
    assert logp.grad[1].tolist() == pytest.approx([0.0, 0.9 * A, 1.5 * A, 0.0], rel=1e-12)  # capped: no gradient


def test_dual_clip_counts_as_clipped(example):
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"],
                      epsilon=EPS, epsilon_high=EPS_HIGH, dual_clip=3.0)
    assert out.clipped[1].tolist() == [1, 0, 0, 1]  # 0.7 < 0.8 (low clip) and 5.0 > c = 3 (dual clip)


def test_example_gspo_sequence_ratio(example):
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"],
                      epsilon=EPS, epsilon_high=EPS_HIGH, level="sequence")
    # one ratio per sequence, exp(masked mean of the token log-ratios), on every position of the sequence:
    r0 = (1.25 * 1.5 * 0.5) ** (1 / 3)  # 0.9375^(1/3) = 0.9787: the masked 7.0 takes no part
    r1 = (0.7 * 0.9 * 1.5 * 5.0) ** (1 / 4)  # 4.725^(1/4) = 1.4743
    r2 = 2.0  # c2 has one active token; its masked 9.0s take no part
    expected_ratio = [[r0] * 4, [r1] * 4, [r2] * 4] + [[1.0] * 4] * 3
    close(out.ratio, expected_ratio)
    # c0 (A = +a): 0.9787 inside [0.8, 1.28] -> -r0 a; c1 (A = -a): 1.4743 > 1.28 but A < 0 -> +r1 a, not clipped
    assert out.per_token[0].tolist() == pytest.approx([-r0 * A] * 4, rel=1e-12)
    assert out.per_token[1].tolist() == pytest.approx([r1 * A] * 4, rel=1e-12)
    assert out.clipped.sum().item() == 0
    norm = Norm(num_sequences=6, num_tokens=17, num_micro_batches=1, max_completion_length=C)
    assert LOSS_TYPES["dapo"](out.per_token, example["mask"], norm).item() == pytest.approx(
        (3 * -r0 + 4 * r1) * A / 17, rel=1e-12)
    # the sequence ratio ignores masked log-probs: move them far away and nothing changes
    moved = torch.where(example["mask"] > 0, example["logp"], example["logp"] - 3.0)
    again = policy_loss(moved, example["old"], example["adv"], example["mask"],
                        epsilon=EPS, epsilon_high=EPS_HIGH, level="sequence")
    assert torch.equal(again.ratio, out.ratio)


def test_example_k3_with_beta(example):
    # reference = policy + d, with d = ln 2 on c2[0], -ln 2 on c3[0], ln 3 on c0[3] (masked), 0 elsewhere
    d = torch.zeros(6, 4, dtype=torch.float64)
    d[2, 0], d[3, 0], d[0, 3] = math.log(2), -math.log(2), math.log(3)
    ref = example["logp"] + d
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"],
                      epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.1, ref_logp=ref)
    # k3 = e^d - d - 1: ln 2 -> 1 - ln 2; -ln 2 -> 1/2 + ln 2 - 1 = ln 2 - 1/2; 0 -> 0 (c0[3] is masked out)
    expected_kl = torch.zeros(6, 4, dtype=torch.float64)
    expected_kl[2, 0], expected_kl[3, 0] = 1 - math.log(2), math.log(2) - 0.5
    close(out.kl, expected_kl.tolist(), example["mask"])
    assert out.per_token[2, 0].item() == pytest.approx(0.1 * (1 - math.log(2)), rel=1e-12)
    assert out.per_token[3, 0].item() == pytest.approx(0.1 * (math.log(2) - 0.5), rel=1e-12)
    # masked-in k3 sum: (1 - ln 2) + (ln 2 - 1/2) = 1/2 -> the loss grows by beta * 1/2 = 0.05
    norm = Norm(num_sequences=6, num_tokens=17, num_micro_batches=1, max_completion_length=C)
    assert LOSS_TYPES["dapo"](out.per_token, example["mask"], norm).item() == pytest.approx((S + 0.05) / 17, rel=1e-12)
    assert kl_k3(example["logp"], example["logp"]).abs().sum().item() == 0.0  # the same policy: k3 is 0


# ---- aggregation: grpo, bnpo, dr_grpo, dapo ---------------------------------------------------------------------

# Masked sums: c0 -3.03a over 3 tokens, c1 +8.2a over 4 tokens, the rest 0; S = 5.17a, 17 tokens, 6 sequences.
EXPECTED_LOSS = {
    #            one micro-batch     2 micro-batches (rows 0-2: 8 tokens, rows 3-5: 9)   no truncated (13 tokens)
    #            drop zero-std groups (rows 3-5 out: 8 tokens)
    "dapo": dict(full=S / 17, split=S / 17, no_trunc=-3.03 * A / 13, drop=S / 8),
    # bnpo: micro-batch means / 2 micro-batches: S / 8 / 2 + 0 / 9 / 2 = S / 16, not S / 17
    "bnpo": dict(full=S / 17, split=S / 16, no_trunc=-3.03 * A / 13, drop=S / 8),
    # dr_grpo: S / (6 sequences * max_completion_length 4); the denominator ignores masks
    "dr_grpo": dict(full=S / 24, split=S / 24, no_trunc=-3.03 * A / 24, drop=S / 24),
    # grpo: sequence means (-3.03a / 3 = -1.01a, 8.2a / 4 = 2.05a, 0, ...) summed (1.04a) / 6 sequences
    "grpo": dict(full=1.04 * A / 6, split=1.04 * A / 6, no_trunc=-1.01 * A / 6, drop=1.04 * A / 6),
}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_example_loss_types(example, loss_type):
    assert set(LOSS_TYPES) == set(EXPECTED_LOSS)
    agg, want = LOSS_TYPES[loss_type], EXPECTED_LOSS[loss_type]
    ro, mask = example["ro"], example["mask"]
    out = policy_loss(example["logp"], example["old"], example["adv"], mask, epsilon=EPS, epsilon_high=EPS_HIGH)
    full = agg(out.per_token, mask, Norm(num_sequences=6, num_tokens=17, num_micro_batches=1,
                                         max_completion_length=C))
    assert full.item() == pytest.approx(want["full"], rel=1e-12)
    # the same batch as 2 micro-batches of 3 rows: their losses add up to the batch loss (except bnpo)
    norm2 = Norm(num_sequences=6, num_tokens=17, num_micro_batches=2, max_completion_length=C)
    split = sum(agg(out.per_token[s], mask[s], norm2) for s in (slice(0, 3), slice(3, 6)))
    assert split.item() == pytest.approx(want["split"], rel=1e-12)
    # mask_truncated_completions: c1 (truncated) leaves the loss
    no_trunc = mask * (~ro.truncated).double()[:, None]
    value = agg(out.per_token, no_trunc, Norm(num_sequences=6, num_tokens=13, num_micro_batches=1,
                                              max_completion_length=C))
    assert value.item() == pytest.approx(want["no_trunc"], rel=1e-12)
    # drop_zero_std_groups (train.py): keep = valid * ~zero_std per completion
    keep = (~example["zero_std"]).double().repeat_interleave(G)
    assert keep.tolist() == [1, 1, 1, 0, 0, 0]
    dropped = mask * keep[:, None]
    value = agg(out.per_token, dropped, Norm(num_sequences=6, num_tokens=8, num_micro_batches=1,
                                             max_completion_length=C))
    assert value.item() == pytest.approx(want["drop"], rel=1e-12)


# ---- robustness of the masking ----------------------------------------------------------------------------------


def test_extreme_log_prob_at_a_masked_position_does_not_poison_the_loss():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    logp = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6]], requires_grad=True)
    adv = torch.tensor([0.0, -1.0])
    norm = Norm(num_sequences=2, num_tokens=3, num_micro_batches=1, max_completion_length=3)
    clean = LOSS_TYPES["dapo"](policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.2).per_token, mask, norm)
    # a garbage log-prob at a masked (post-EOS pad) position: ratio e^100 overflows float32 to inf
    garbage = torch.where(mask > 0, logp, torch.tensor(100.0))
    loss = LOSS_TYPES["dapo"](policy_loss(garbage, old, adv, mask, epsilon=0.2, epsilon_high=0.2).per_token, mask, norm)
    loss.backward()
    assert loss.item() == pytest.approx(clean.item())
    assert torch.isfinite(logp.grad).all()


# ---- DAPO soft overlong punishment (eq. 13) ---------------------------------------------------------------------


def test_soft_overlong_punishment_by_hand():
    # L_max = 10, L_cache = 4: 0 up to L = 6, then (6 - L) / 4 down to -1 at L = 10
    fn = soft_overlong_punishment(10, 4)
    lengths = [0, 5, 6, 7, 8, 9, 10]
    ids = [[1] * n for n in lengths]
    assert fn([""] * 7, [""] * 7, completion_ids=ids) == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0]
    # the whole length as buffer: linear from 0 at L = 0, (0 - 5) / 10 = -0.5 at L = 5
    assert soft_overlong_punishment(10, 10)([], ["", ""], completion_ids=[[], [7] * 5]) == [0.0, -0.5]
    # buffer 1: only a completion of exactly L_max is punished
    assert soft_overlong_punishment(3, 1)([], ["", ""], completion_ids=[[1, 2], [1, 2, 3]]) == [0.0, -1.0]


def test_load_reward_overlong_uses_the_run_options():
    fn = load_reward("overlong", {"max_completion_length": 16, "overlong_buffer": 8})
    # start = 16 - 8 = 8: L = 8 -> 0, L = 12 -> (8 - 12) / 8 = -0.5, L = 14 -> -6/8 = -0.75, L = 16 -> -1
    assert fn(["q"] * 4, ["x"] * 4, completion_ids=[[0] * 8, [0] * 12, [0] * 14, [0] * 16]) == [0.0, -0.5, -0.75, -1.0]
    for bad in (0, 17):
        with pytest.raises(ValueError, match="overlong_buffer"):
            load_reward("overlong", {"max_completion_length": 16, "overlong_buffer": bad})
