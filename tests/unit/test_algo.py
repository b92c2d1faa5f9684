"""The GRPO math on small tensors, with expected values computed by hand in the comments."""

import math

import pytest
import torch

from minigrpo.algo import (
    LOSS_TYPES,
    Norm,
    completion_mask,
    group_advantages,
    kl_k3,
    masked_mean,
    policy_loss,
    token_logprobs,
)


def test_completion_mask_first_eos_included_pad_equals_eos():
    eos = 9
    ids = torch.tensor([[5, 9, 9, 9],  # EOS at 1, then pads that are also EOS: keep positions 0..1
                        [5, 6, 7, 8],  # no EOS: truncated, keep everything
                        [9, 9, 9, 9]])  # EOS first: keep only it
    assert completion_mask(ids, [eos]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask(torch.tensor([[5, 3, 2, 9]]), [2, 9]).tolist() == [[1, 1, 1, 0]]  # several EOS ids


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    valid = torch.ones(8)
    adv, zero_std = group_advantages(rewards, valid, 4, "group")
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 -> 0.75 / 0.5001, -0.25 / 0.5001
    assert adv[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert adv[4:].tolist() == [0.0] * 4  # zero-variance group: exactly 0, flagged
    assert zero_std.tolist() == [False, True]
    adv_none, _ = group_advantages(rewards, valid, 4, "none")
    assert adv_none[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    adv_batch, _ = group_advantages(rewards, valid, 4, "batch")
    batch_std = rewards.std().item()  # over all 8 rewards
    assert adv_batch[:4].tolist() == pytest.approx([x / (batch_std + 1e-4) for x in (0.75, -0.25, -0.25, -0.25)])


def test_group_advantages_skip_invalid_samples():
    rewards = torch.tensor([1.0, 0.0, 5.0, 0.0])
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0])  # sample 2 returned None: out of the statistics, advantage 0
    adv, _ = group_advantages(rewards, valid, 4, "none")
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, 0.0, -1 / 3])


def test_token_logprobs_at_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax at T=1: [1/4, 3/4]
    logp, entropy = token_logprobs(logits, torch.tensor([[1]]), temperature=1.0)
    assert logp.item() == pytest.approx(math.log(0.75))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logp2, _ = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0)  # [1, sqrt 3] -> sqrt3 / (1 + sqrt3)
    assert logp2.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))


def _case():
    # 2 completions x 3 tokens; row 0 has 2 real tokens, row 1 has 3.
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    logp = torch.zeros(2, 3)
    logp[0, 0] = math.log(1.5)  # A > 0, ratio 1.5 > 1.2: clipped to 1.2 -> loss -1.2
    logp[1, 0] = math.log(0.5)  # A < 0, ratio 0.5 < 0.8: clipped to 0.8 -> loss +0.8
    return logp, old, torch.tensor([1.0, -1.0]), mask


def test_policy_loss_clipping_by_hand():
    logp, old, adv, mask = _case()
    out = policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.2)
    # row 0: [-1.2, -1, -1 (masked)]; row 1: [0.8, 1, 1]
    assert out.per_token.flatten().tolist() == pytest.approx([-1.2, -1.0, -1.0, 0.8, 1.0, 1.0])
    assert out.clipped.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    # clip-higher: eps_high = 0.6 lets ratio 1.5 through -> -1.5
    out = policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.6)
    assert out.per_token[0, 0].item() == pytest.approx(-1.5)


@pytest.mark.parametrize("loss_type, expected", [
    # masked per-token losses: row 0 [-1.2, -1], row 1 [0.8, 1, 1]; sum = 0.6, 5 tokens, 2 sequences
    ("dapo", 0.6 / 5),
    ("bnpo", 0.6 / 5),
    ("grpo", ((-2.2 / 2) + (2.8 / 3)) / 2),
    ("dr_grpo", 0.6 / (2 * 4)),  # max_completion_length = 4
])
def test_loss_aggregation_by_hand(loss_type, expected):
    logp, old, adv, mask = _case()
    out = policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.2)
    norm = Norm(num_sequences=2, num_tokens=5, num_micro_batches=1, max_completion_length=4)
    assert LOSS_TYPES[loss_type](out.per_token, mask, norm).item() == pytest.approx(expected)


def test_k3_by_hand_and_in_loss():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(1.0)]])  # d = ref - logp = ln 2: k3 = 2 - ln 2 - 1
    assert kl_k3(logp, ref).item() == pytest.approx(1 - math.log(2))
    assert kl_k3(ref, ref).item() == 0.0
    out = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), epsilon=0.2, epsilon_high=0.2, beta=0.5,
                      ref_logp=ref)
    assert out.per_token.item() == pytest.approx(0.5 * (1 - math.log(2)))


def test_masked_mean_ignores_masked_values():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == 1.5
    assert masked_mean(x, m, dim=1).tolist() == [1.5]
