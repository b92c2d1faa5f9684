"""The sampler/trainer mismatch: the correction's weights (algo.sampler_correction) computed by hand for every mode,
the surrogate they weight, and what a step logs (train.SamplerCheck)."""

import math

import pytest
import torch

from minigrpo.algo import SAMPLER_CORRECTIONS, kl_k3, policy_loss, sampler_correction
from minigrpo.config import Config, ConfigError, load_config
from minigrpo.train import SamplerCheck

NAN = float("nan")
# Row 0: 3 tokens then padding (a masked position). Row 1: 2 tokens, the second's sampler log-prob unknown (NaN:
# an EOS vLLM did not return). Row 2: truncated (no EOS), every position a token.
OLD = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.3, -0.2, 0.0, 0.0], [-0.1, -0.2, -0.3, -0.4]])
SAMPLER = torch.tensor([[-1.1, -1.0, -0.5, 5.0], [-1.0, NAN, 0.0, 0.0], [-0.1, -0.2, -0.3, -0.4]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
e = math.exp


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_token_ratios_by_hand():
    # row 0: log ratios 0.1, -1.0, 0.0; row 1: 0.7 then unknown (ratio 1); row 2: the sampler agrees
    weights, ratio = sampler_correction(OLD, SAMPLER, MASK, "token_truncate", 0.0, 3.0)
    _close(ratio[0, :3], [e(0.1), e(-1.0), 1.0])
    _close(ratio[1, :2], [e(0.7), 1.0])
    _close(weights, [[e(0.1), e(-1.0), 1.0, 0.0], [e(0.7), 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_token_truncate_clips_to_the_bounds():
    weights, _ = sampler_correction(OLD, SAMPLER, MASK, "token_truncate", 0.5, 2.0)
    _close(weights, [[e(0.1), 0.5, 1.0, 0.0], [2.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_token_mask_zeroes_outside_the_bounds():
    weights, _ = sampler_correction(OLD, SAMPLER, MASK, "token_mask", 0.5, 2.0)
    _close(weights, [[e(0.1), 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_sequence_ratio_is_the_geometric_mean_of_the_known_tokens():
    # row 0: (0.1 - 1.0 + 0) / 3 = -0.3 (the padding's huge difference ignored); row 1: 0.7 / 1 (the NaN left out)
    weights, ratio = sampler_correction(OLD, SAMPLER, MASK, "sequence_truncate", 0.0, 3.0)
    _close(ratio[:, 0], [e(-0.3), e(0.7), 1.0])
    _close(weights, [[e(-0.3)] * 3 + [0.0], [e(0.7)] * 2 + [0.0, 0.0], [1.0] * 4])
    truncated, _ = sampler_correction(OLD, SAMPLER, MASK, "sequence_truncate", 0.0, 1.5)
    _close(truncated[1], [1.5, 1.5, 0.0, 0.0])
    masked, _ = sampler_correction(OLD, SAMPLER, MASK, "sequence_mask", 0.8, 1.5)
    _close(masked, [[0.0] * 4, [0.0] * 4, [1.0] * 4])  # row 0 below 0.8, row 1 above 1.5: whole sequences out


def test_a_sum_would_have_shrunk_long_sequences():
    """The field's 2026 bug (TRL #5814): exp of the sum over a sequence's tokens. A long sequence whose every token
    differs by -0.01 has weight exp(-0.01) here, not exp(-0.01 * T)."""
    T = 500
    old, sampler, mask = torch.full((1, T), -1.01), torch.full((1, T), -1.0), torch.ones(1, T)
    weights, _ = sampler_correction(old, sampler, mask, "sequence_mask", 0.0, 3.0)
    _close(weights[0, :3], [e(-0.01)] * 3)


def test_agreeing_policies_give_weight_one_everywhere():
    for mode in SAMPLER_CORRECTIONS:
        weights, ratio = sampler_correction(OLD, OLD.clone(), MASK, mode, 0.0, 3.0)
        assert torch.equal(weights, MASK) and torch.equal(ratio, torch.ones_like(ratio))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode.*sequence_mask"):
        sampler_correction(OLD, SAMPLER, MASK, "sequence", 0.0, 3.0)


def test_the_weights_multiply_the_surrogate_not_the_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = logp + 0.2
    w = torch.tensor([[0.5, 2.0]])
    out = policy_loss(logp, logp.clone(), torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2, beta=0.1,
                      ref_logp=ref, sampler_weights=w)
    k3 = e(0.2) - 0.2 - 1  # ratio 1, A = 1: the surrogate is -1 per token
    _close(out.per_token, [[-0.5 + 0.1 * k3, -2.0 + 0.1 * k3]])
    plain = policy_loss(logp, logp.clone(), torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2)
    _close(plain.per_token, [[-1.0, -1.0]])


def test_sampler_check_logs_the_mismatch_and_corrects_only_for_vllm_stale_or_lower_precision_batches():
    # known tokens: row 0 |d| 0.1, 1.0, 0; row 1 0.7; row 2 0 x 4 -> 8 tokens, sum 1.8, max 1.0
    for backend, staleness, rollout_dtype, corrected in (("engine", 0, "auto", False), ("vllm", 0, "auto", True),
                                                         ("engine", 1, "auto", True),
                                                         ("engine", 0, "float32", False),  # the weights' own
                                                         ("engine", 0, "bfloat16", True),
                                                         ("engine", 0, "float16", True)):
        check = SamplerCheck(Config(rollout_backend=backend, vllm_importance_sampling_mode="token_mask",
                                    vllm_importance_sampling_clip_max=2.0, max_staleness=staleness,
                                    rollout_dtype=rollout_dtype))
        weights = check.weights(OLD, SAMPLER, MASK)
        m = check.metrics()
        assert m["rollout/logprob_diff_mean"] == pytest.approx(1.8 / 8)
        assert m["rollout/logprob_diff_max"] == pytest.approx(1.0)
        known = MASK.bool() & torch.isfinite(SAMPLER)
        assert m["rollout/sampler_kl"] == pytest.approx(kl_k3(SAMPLER[known], OLD[known]).sum().item() / 8)
        assert m["rollout/sampler_kl"] == pytest.approx((e(0.1) - 1.1 + e(-1) + 1 - 1 + e(0.7) - 1.7) / 8)
        if not corrected:
            assert weights is None and "rollout/is_ratio_mean" not in m
        else:  # token ratios e^.1, e^-1, 1, e^.7, 1 x 4: one (e^.7 > 2) masked
            ratios = [e(0.1), e(-1), 1, e(0.7), 1, 1, 1, 1]
            assert m["rollout/is_ratio_mean"] == pytest.approx(sum(ratios) / 8)
            mean = sum(ratios) / 8
            assert m["rollout/is_ratio_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in ratios) / 8))
            assert m["rollout/is_ratio_min"] == pytest.approx(e(-1)) and m["rollout/is_ratio_max"] == pytest.approx(
                e(0.7))
            assert m["rollout/is_clipped_frac"] == pytest.approx(1 / 8)
            assert weights[1, 0] == 0


def test_sampler_check_logs_nan_not_nothing_when_no_token_counts():
    """Every process must log the same keys (reduce_metrics pairs them by name): a micro-batch with no known token
    gives NaN figures, not missing ones."""
    check = SamplerCheck(Config(rollout_backend="vllm", vllm_importance_sampling_mode="token_truncate"))
    check.weights(OLD, torch.full_like(SAMPLER, NAN), MASK)
    m = check.metrics()
    assert sorted(m) == sorted(["rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/sampler_kl",
                                "rollout/is_ratio_mean", "rollout/is_ratio_std", "rollout/is_ratio_min",
                                "rollout/is_ratio_max", "rollout/is_clipped_frac"])
    assert all(math.isnan(v) for v in m.values())
    sequence = SamplerCheck(Config(rollout_backend="vllm"))  # sequence_mask: a sequence with no known token has ratio 1
    sequence.weights(OLD, torch.full_like(SAMPLER, NAN), MASK)
    assert sequence.metrics()["rollout/is_ratio_mean"] == 1 and math.isnan(sequence.metrics()["rollout/sampler_kl"])
    assert SamplerCheck(Config()).metrics() == {}  # no log-probs from the backend: nothing to log


def test_correction_with_a_truncated_sampler_is_refused():
    for key in ("top_p=0.9", "top_k=20"):
        name, value = key.split("=")
        with pytest.raises(ConfigError, match="top_p.*truncated distribution.*vllm_importance_sampling_correction"):
            load_config(None, {"rollout_backend": "vllm", name: value}).validate_grpo()
        cfg = load_config(None, {"rollout_backend": "vllm", name: value,
                                 "vllm_importance_sampling_correction": "false"})
        cfg.validate_grpo()  # without the correction: allowed
        with pytest.raises(ConfigError, match="vllm_logprob_tolerance"):  # nor the tolerance, which would misfire
            load_config(None, {"rollout_backend": "vllm", name: value, "vllm_importance_sampling_correction": "false",
                               "vllm_logprob_tolerance": "0.01"}).validate_grpo()
    with pytest.raises(ConfigError, match="clip_min.*below"):
        load_config(None, {"vllm_importance_sampling_clip_min": "3"}).validate_grpo()
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode"):
        load_config(None, {"vllm_importance_sampling_mode": "sequence"})
    with pytest.raises(ConfigError, match="vllm_importance_sampling_clip_max"):
        load_config(None, {"vllm_importance_sampling_cap": "2"})  # TRL's older name: the new one suggested
