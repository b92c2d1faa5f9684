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

from minigrpo.algo import (
    LOSS_TYPES,
    EntropyControl,
    Norm,
    completion_mask,
    decoupled_rewards,
    entropy_bonus,
    group_advantages,
    high_entropy_mask,
    kl_k3,
    policy_loss,
)
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
    # luspo: S / 6 sequences (each sequence's sum: its loss times its length); the denominator ignores masks
    "luspo": dict(full=S / 6, split=S / 6, no_trunc=-3.03 * A / 6, drop=S / 6),
}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
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


# ---- 2026 surrogates (loss_mode), delta, unbiased KL, masks, entropy bonus (issue 22) ------------------------------
# On the same example: old_logp[i][t] = -(4i + t + 1) / 7 and logp = old_logp + ln r with r from RATIOS.


def old_logp(i: int, t: int) -> float:
    return -(4 * i + t + 1) / 7


def new_logp(i: int, t: int) -> float:
    return old_logp(i, t) + math.log(RATIOS[i][t])


def test_example_cispo(example):
    # the weight min(r, eps_high) is capped (eps_high = 1.4 here: ScaleRL's 5 would cap nothing) and carries no
    # gradient: per token -min(r, 1.4) * A * logp
    logp = example["logp"].clone().requires_grad_(True)
    out = policy_loss(logp, example["old"], example["adv"], example["mask"], epsilon=EPS, epsilon_high=1.4,
                      loss_mode="cispo")
    m = example["mask"]
    expected = [[-1.25 * A * new_logp(0, 0), -1.4 * A * new_logp(0, 1), -0.5 * A * new_logp(0, 2), 0.0],
                [w * A * new_logp(1, t) for t, w in enumerate([0.7, 0.9, 1.4, 1.4])],
                [0.0] * 4] + [[0.0] * 4] * 3  # c2..c5: A = 0, the zero-variance group included
    close(out.per_token, expected, m)
    # only A > 0 tokens over the cap count as clipped (TRL's cispo_clip_ratio): c0's 1.5
    assert (out.clipped * m).tolist() == [[0, 1, 0, 0]] + [[0] * 4] * 5
    (out.per_token * m).sum().backward()
    # d/dlogp = -w * A: every active token keeps a gradient, the capped ones too (unlike the clipped surrogate)
    assert logp.grad[0].tolist() == pytest.approx([-1.25 * A, -1.4 * A, -0.5 * A, 0.0], rel=1e-12)
    assert logp.grad[1].tolist() == pytest.approx([0.7 * A, 0.9 * A, 1.4 * A, 1.4 * A], rel=1e-12)
    assert logp.grad[2:].abs().sum().item() == 0.0


def test_example_sapo(example):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    logp = example["logp"].clone().requires_grad_(True)
    out = policy_loss(logp, example["old"], example["adv"], example["mask"], epsilon=EPS, loss_mode="sapo",
                      sapo_temperatures=(1.0, 1.05))
    m = example["mask"]
    # -sigmoid(tau (r - 1)) * 4 / tau * A: tau 1 for c0 (A > 0), 1.05 for c1 (A < 0)
    pos = [-sig(r - 1) * 4 * A for r in RATIOS[0][:3]]
    neg = [sig(1.05 * (r - 1)) * 4 / 1.05 * A for r in RATIOS[1]]
    close(out.per_token[:2], [pos + [0.0], neg], m[:2])
    close(out.per_token[2:], [[0.0] * 4] * 4, m[2:])  # A = 0
    assert out.clipped.sum().item() == 0  # no hard clip
    (out.per_token * m).sum().backward()
    # d/dlogp = -4 sig'(tau (r - 1)) r A: at r far from 1 the gate fades (c1's 5.0: 0.06 of the vanilla gradient)
    dsig = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    assert logp.grad[1].tolist() == pytest.approx([4 * dsig(1.05 * (r - 1)) * r * A for r in RATIOS[1]], rel=1e-12)
    # on-policy (r = 1) the gate's slope is 1: the gradient equals the vanilla surrogate's, -A per token
    at_one = example["old"].clone().requires_grad_(True)
    (policy_loss(at_one, example["old"], example["adv"], m, epsilon=EPS, loss_mode="sapo").per_token * m).sum() \
        .backward()
    close(at_one.grad * m, (-example["adv"][:, None] * m).tolist())


def test_example_vespo(example):
    m = example["mask"]
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, loss_mode="vespo",
                      vespo_params=(2.0, 3.0, 3.0, 2.0))
    # w = product of the active tokens' ratios; phi(w) = e^lam * w^k * e^(-lam w), phi(1) = 1
    w0, w1 = 1.25 * 1.5 * 0.5, 0.7 * 0.9 * 1.5 * 5.0  # 0.9375 (the masked 7.0 takes no part), 4.725
    phi0 = math.exp(3.0) * w0 ** 2 * math.exp(-3.0 * w0)  # A > 0: k 2, lambda 3
    phi1 = math.exp(2.0) * w1 ** 3 * math.exp(-2.0 * w1)  # A < 0: k 3, lambda 2
    expected = [[-phi0 * A * new_logp(0, t) for t in range(3)] + [0.0],
                [phi1 * A * new_logp(1, t) for t in range(4)]] + [[0.0] * 4] * 4
    close(out.per_token, expected, m)
    # the sampler's weights join w in logs: a token weight of 2 on c0's first token doubles w0
    weights = torch.ones(6, 4, dtype=torch.float64) * m
    weights[0, 0] = 2.0
    again = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, loss_mode="vespo",
                        sampler_weights=weights)
    phi0b = math.exp(3.0) * (2 * w0) ** 2 * math.exp(-3.0 * 2 * w0)
    close(again.per_token[0], [-phi0b * A * new_logp(0, t) for t in range(3)] + [0.0], m[0])


def test_example_delta_two_sided_clip(example):
    m = example["mask"]
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      delta=3.0)
    # c1 (A < 0) ratio 5.0: -min(min(5, 3) * -a, 1.28 * -a) = 3a (5a without delta); everything else unchanged
    close(out.per_token[:2], [[-1.25 * A, -1.28 * A, -0.5 * A, 0.0], [0.8 * A, 0.9 * A, 1.5 * A, 3.0 * A]], m[:2])
    assert out.clipped[1].tolist() == [1, 0, 0, 1]
    logp = example["logp"].clone().requires_grad_(True)
    (policy_loss(logp, example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH, delta=3.0).per_token
     * m).sum().backward()
    assert logp.grad[1].tolist() == pytest.approx([0.0, 0.9 * A, 1.5 * A, 0.0], rel=1e-12)  # capped: no gradient


def test_example_luspo_with_sequence_ratios(example):
    out = policy_loss(example["logp"], example["old"], example["adv"], example["mask"], epsilon=EPS,
                      epsilon_high=EPS_HIGH, level="sequence")
    r0, r1 = 0.9375 ** (1 / 3), 4.725 ** (1 / 4)
    # each sequence's loss times its length, over 6 sequences: (3 * -r0 a + 4 * r1 a) / 6
    norm = Norm(num_sequences=6, num_tokens=17, num_micro_batches=1, max_completion_length=C)
    assert LOSS_TYPES["luspo"](out.per_token, example["mask"], norm).item() == pytest.approx(
        (3 * -r0 + 4 * r1) * A / 6, rel=1e-12)


def test_example_unbiased_kl(example):
    m = example["mask"]
    # reference = old policy: d = ref - logp = -ln r, k3 = 1/r + ln r - 1; unbiased: times r -> 1 + r ln r - r
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      beta=0.1, ref_logp=example["old"], unbiased_kl=True)
    expected = [[1 + r * math.log(r) - r for r in row] for row in RATIOS]
    close(out.kl, expected, m)
    plain = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                        beta=0.1, ref_logp=example["old"])
    close(plain.kl, [[1 / r + math.log(r) - 1 for r in row] for row in RATIOS], m)
    # zero where the policies agree (c3..c5 have r = 1), and wherever logp == ref
    assert (out.kl[3:] * m[3:]).abs().sum().item() == 0.0
    same = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, beta=0.1,
                       ref_logp=example["logp"], unbiased_kl=True)
    assert (same.kl * m).abs().sum().item() == 0.0


def test_example_off_policy_mask(example):
    m = example["mask"]
    # sampler log-probs 0.6 above the current policy on c0 (A > 0) and c1 (A < 0), equal on the rest: only c1 is
    # dropped (A < 0 and mean drift 0.6 > 0.5); c0 is kept whatever its drift (A >= 0)
    sampler = example["logp"].clone()
    sampler[:2] += 0.6
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      off_policy_threshold=0.5, sampler_logp=sampler)
    assert out.kept[:, 0].tolist() == [1, 0, 1, 1, 1, 1]
    close(out.per_token[:2], [[-1.25 * A, -1.28 * A, -0.5 * A, 0.0], [0.0] * 4], m[:2])
    # without sampler log-probs the old ones stand in: c1's drift is -mean ln r = -ln(4.725) / 4 < 0.5: kept
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      off_policy_threshold=0.5)
    assert out.kept[:, 0].tolist() == [1] * 6
    # a threshold below c1's drift (-0.388): dropped; NaN sampler entries fall back to the old log-probs
    nan_sampler = torch.full_like(sampler, float("nan"))
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      off_policy_threshold=0.0, sampler_logp=nan_sampler)
    assert -math.log(4.725) / 4 < 0 and out.kept[:, 0].tolist() == [1] * 6
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      off_policy_threshold=0.0, sampler_logp=example["old"] + 1.0)
    assert out.kept[:, 0].tolist() == [1, 0, 1, 1, 1, 1]  # c1: drift 1 - mean ln r = 0.612 > 0


def test_example_high_entropy_selection_and_bonus(example):
    m = example["mask"]
    # entropies 1..24 row by row; the 17 active ones are 1 2 3 | 5 6 7 8 | 9 | 13 14 | 17 18 19 20 | 21 22 23
    entropy = torch.arange(1, 25, dtype=torch.float64).view(6, 4)
    # rho = 0.25: threshold = the 0.75 quantile of the 17 = sorted[12] (0.75 * 16 = 12 exactly) = 19
    kept = high_entropy_mask(entropy, m, 0.25)
    assert kept.tolist() == [[0] * 4, [0] * 4, [0] * 4, [0] * 4, [0, 0, 1, 1], [1, 1, 1, 0]]  # 19 20 21 22 23
    assert kept.sum().item() == 5 == 17 - math.ceil(0.75 * 16)
    assert high_entropy_mask(entropy, m, 0.0).tolist() == [[0] * 4] * 5 + [[0, 0, 1, 0]]  # the highest only: 23
    assert torch.equal(high_entropy_mask(entropy, m, 1.0), m)  # all valid tokens, never a masked one (24, 4, ...)
    # masked tokens multiply the surrogate only: c0..c1 (the only A != 0 rows) are all dropped here
    out = policy_loss(example["logp"], example["old"], example["adv"], m, epsilon=EPS, epsilon_high=EPS_HIGH,
                      token_mask=kept)
    assert (out.per_token * m).abs().sum().item() == 0.0
    # the bonus: sum of the selected entropies / the batch's 17 active tokens: (19+20+21+22+23) / 17
    norm = Norm(num_sequences=6, num_tokens=17, num_micro_batches=1, max_completion_length=C)
    assert entropy_bonus(entropy, m * kept, norm).item() == pytest.approx(105 / 17, rel=1e-12)
    assert entropy_bonus(entropy, m, norm).item() == pytest.approx(
        (6 + 26 + 9 + 27 + 74 + 66) / 17, rel=1e-12)  # every active token


def test_adaptive_entropy_control_by_hand():
    c = EntropyControl(0.01, adaptive=True, target=0.5, step=0.005, low=0.0, high=0.012)
    assert c.applied() == 0.0  # no measurement yet: no bonus (TRL's conservative start)
    c.update(0.4)  # at or below the target: up by the step, capped at the bound
    assert c.coef == pytest.approx(0.012) and c.applied() == pytest.approx(0.012)
    c.update(0.6)  # above: down by the step; and not applied while above the target
    assert c.coef == pytest.approx(0.007) and c.applied() == 0.0
    for _ in range(3):
        c.update(0.9)
    assert c.coef == 0.0  # floored at the lower bound
    fixed = EntropyControl(0.03)
    fixed.update(0.0)
    assert fixed.applied() == 0.03 and fixed.coef == 0.03  # not adaptive: constant


# ---- advantage estimators (adv_estimator) and GDPO ---------------------------------------------------------------
# rewards [2, 0, 1 | 1, 1, 1]; loss tokens per completion (MASK) [3, 4, 1 | 2, 4, 3] = 17


def test_example_rloo():
    adv, zero_std = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.ones(6), G, "group",
                                     estimator="rloo")
    # r_i - mean of the other two: 2 - 0.5 = 1.5, 0 - 1.5 = -1.5, 1 - 1 = 0; the flat group exactly 0
    assert adv.tolist() == [1.5, -1.5, 0.0, 0.0, 0.0, 0.0]
    assert zero_std.tolist() == [False, True]
    # a skipped sample takes no part: [2, -, 1] -> 2 - 1 = 1, 1 - 2 = -1, the skipped one 0
    adv, _ = group_advantages(torch.tensor([2.0, 9.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]), 3, estimator="rloo")
    assert adv.tolist() == [1.0, 0.0, -1.0]


@pytest.mark.parametrize("baseline", [False, True])
def test_example_reinforce_plus_plus(baseline):
    lengths = torch.tensor([3.0, 4.0, 1.0, 2.0, 4.0, 3.0])
    estimator = "reinforce_plus_plus_baseline" if baseline else "reinforce_plus_plus"
    adv, zero_std = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), torch.ones(6), G,
                                     estimator=estimator, lengths=lengths)
    # x = r (or r - group mean: [1, -1, 0 | 0, 0, 0]); token-weighted mean over 17 tokens:
    #   plain: (2*3 + 0*4 + 1*(1 + 2 + 4 + 3)) / 17 = 16/17;  baseline: (3 - 4) / 17 = -1/17
    # deviations are then 18/17 (3 tokens), -16/17 (4 tokens), 1/17 (10 tokens) in both cases, so the unbiased
    # token variance is (3 * 18^2 + 4 * 16^2 + 10) / 17^2 / 16 = 2006 / 4624
    std = math.sqrt(2006 / 4624 + 1e-8)
    expected = [18 / 17 / std, -16 / 17 / std] + [1 / 17 / std] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)
    assert zero_std.tolist() == [False, True]  # flagged, yet it moves: the baseline is the batch's


def test_example_grpo_passk():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    adv, _ = group_advantages(rewards, torch.ones(6), G, "group", estimator="grpo_passk")
    # group 0: only its best (c0, 2) gets (2 - 1) / (std 1 + 1e-4); group 1 is flat
    assert adv.tolist() == pytest.approx([1 / 1.0001, 0, 0, 0, 0, 0], rel=1e-12)
    adv, _ = group_advantages(rewards, torch.ones(6), G, "none", estimator="grpo_passk")
    assert adv.tolist() == [1.0, 0, 0, 0, 0, 0]
    # a tie at the top has no margin: [1, 1, 0] -> 0 everywhere
    adv, _ = group_advantages(torch.tensor([1.0, 1.0, 0.0]), torch.ones(3), 3, "none", estimator="grpo_passk")
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_gdpo_decoupled_rewards_by_hand():
    # two functions on one group of 3, weights 1 and 2: f1 = [1, 0, 0] (mean 1/3, std sqrt(1/3)),
    # f2 = [0.5, 0.5, 0.5] (flat: std 0 -> every z 0); a row where both are missing is NaN
    per_func = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.0, 0.5], [math.nan, math.nan], [1.0, 0.0], [1.0, 1.0]])
    total = decoupled_rewards(per_func, torch.tensor([1.0, 2.0]), 3)
    s = math.sqrt(1 / 3) + 1e-4
    assert total[:3].tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], rel=1e-6)
    # group 2: row 3 unknown; f1 = [1, 1] flat -> 0; f2 = [0, 1]: mean 0.5, std sqrt(0.5): z = -+0.5 / (0.7072)
    assert math.isnan(total[3].item())
    z = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert total[4:].tolist() == pytest.approx([2 * -z, 2 * z], rel=1e-6)
