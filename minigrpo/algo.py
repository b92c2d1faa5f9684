"""The GRPO algorithm as pure tensor functions. Everything the loss needs is here, nothing else.

Per token t of completion i in a group of G completions of one prompt (DeepSeekMath, Shao et al. 2024):

    A_i       = (r_i - mean(r_group)) / (std(r_group) + 1e-4)        scale_rewards="group"
                 std of the whole batch: "batch";   no division: "none" (Dr. GRPO, Liu et al. 2025)
    ratio_it  = exp(logp_theta(o_it) - logp_old(o_it))                  token level (GRPO)
                exp(mean_t(logp_theta - logp_old)) for every t of i     sequence level (GSPO, Zheng et al. 2025)
    L_it      = -min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps_high) * A_i) + beta * k3_it
    k3_it     = exp(ref_it - logp_it) - (ref_it - logp_it) - 1  >= 0   (Schulman 2020, "Approximating KL")

Log-probs are taken from logits / temperature, the distribution the completions were sampled from.
The mask keeps completion tokens up to and including the first EOS (correct when pad == eos).

Token aggregation, `loss_type` (sums run over masked tokens of the whole accumulated batch; each
micro-batch contributes its share, so accumulation gives the same gradient as one big batch, except with
top_entropy_quantile < 1, whose quantile is the micro-batch's, as TRL's):

    grpo     mean over each sequence's tokens, then mean over sequences     (DeepSeekMath; length bias)
    bnpo     sum over the micro-batch's tokens / its active tokens            (per micro-batch, as TRL)
    dr_grpo  sum / (num sequences * max_completion_length)                  (Dr. GRPO, constant denominator)
    dapo     sum / active tokens of the whole accumulated batch             (DAPO, Yu et al. 2025; default)
    luspo    sum / num sequences: each sequence weighs its length           (LUSPO, 2602.05261; sequence level)

Options: clip-higher (`epsilon_high` > `epsilon`, DAPO); dual-clip (Ye et al. 2020): for A < 0 the loss
is capped at -c * A so a huge ratio cannot blow it up; `std_floor` on the advantage divisor.

Sampler correction (`sampler_correction`, rollout_backend vllm): vLLM's log-probs of the tokens it sampled differ
from the trainer's by numerics (other kernels, precisions), so the samples come from a slightly different policy
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"). The surrogate of each
token is weighted by w = exp(logp_old - logp_sampler), per token or per sequence (exp of the mean over its tokens:
the geometric mean, as GSPO's ratio; a sum would shrink long sequences' weights), then truncated to
[clip_min, clip_max] (TIS) or set to 0 outside it (MIS: "When speed kills stability", 2025; IcePop):
    L_it = w_it * L_clip_it + beta * k3_it

The surrogate, `loss_mode` (verl's key; TRL's `loss_type` values cispo / sapo / vespo are accepted and split into
loss_mode + aggregation, config.py). With r the ratio at `importance_sampling_level` and sg() a stopped gradient:

    vanilla  -min(r * A, clip(r, 1 - eps, 1 + eps_high) * A)      PPO / GRPO (default); `delta` (INTELLECT-2,
             2505.07291) caps r at delta in the first term: a negative advantage's loss stays bounded
    cispo    -sg(min(r, eps_high)) * A * logp_it                  CISPO (MiniMax-M1 2506.13585; ScaleRL's
             eps_max = 5): the weight is capped, never the gradient: every token keeps one
    sapo     -sigmoid(tau * (r - 1)) * 4 / tau * A                 SAPO (2511.20347): a soft gate, slope 1 at
             r = 1, fading off-policy; tau = sapo_temperature_pos (A > 0) or _neg (A <= 0)
    vespo    -sg(phi(w_i)) * A * logp_it                          VESPO (2602.10693): phi(w) = exp(lam + k log w
             - lam w), phi(1) = 1, of the sequence ratio w_i = prod_t r_it (times the sampler's weights);
             (k, lam) = vespo_k_pos, vespo_lambda_pos (A >= 0) or the _neg pair

Token selection and masks (multiply the surrogate, not the KL term; the aggregation's counts are unchanged, as TRL):
    top_entropy_quantile rho   keep tokens whose entropy >= the (1 - rho) quantile of the micro-batch's valid
                               tokens over every process ("Beyond the 80/20 rule", 2506.01939)
    off_policy_mask_threshold  drop a sequence with A < 0 whose mean (logp_sampler - logp_theta) exceeds it
                               (DeepSeek-V3.2, 2512.02556)
KL option `use_bias_correction_kl` (DeepSeek-V3.2): k3 * r, unbiased for samples of pi_old.
Entropy bonus (`entropy_coef`, TRL's key): loss - c * sum(H over the kept tokens) / active tokens of the batch.
Adaptive (Skywork-OR1, 2505.22312): after each update c moves by entropy_coef_delta, up while the entropy is <=
entropy_target, down otherwise, within [entropy_coef_min, entropy_coef_max]; applied only while entropy <= target.

Advantage estimators, `adv_estimator` (verl's names and definitions; n = valid samples of the group):
    grpo                          (r_i - mean) / scale                                 DeepSeekMath
    rloo                          r_i - mean of the other n - 1                        Ahmadian et al. 2024
    reinforce_plus_plus           r_i whitened over the batch's tokens                 REINFORCE++, 2501.03262
    reinforce_plus_plus_baseline  (r_i - group mean) whitened over the batch's tokens  REINFORCE++
    grpo_passk                    the group's best only: (r_max - r_second) / scale    pass@k, 2503.19595
`scale_rewards` and `std_floor` make the divisor of grpo and grpo_passk; a flat group (ties) gives exactly 0 under
grpo, rloo and grpo_passk, while the REINFORCE++ pair has a batch baseline: a flat group still moves.
`multi_objective_aggregation` normalize_then_sum (GDPO, 2601.05242): each reward function normalised within its
group, weighted and summed, then grpo with the batch's std; sum_then_normalize (default): r is the weighted sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along `dim`); 0 where mask is empty."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it. [B, C] -> [B, C] float.

    Built from the position of the first EOS, never from `!= pad_id`: when pad == eos, masking pads
    also drops the terminating EOS and the model never learns to stop (seen in tiny-grpo).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [B, C]
    C = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], C, dtype=torch.long))
    return (torch.arange(C, device=completion_ids.device)[None, :] <= first[:, None]).float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of each position. [B, T, V], [B, T] -> [B, T], [B, T].

    Computed in fp32 at the sampling temperature (a temperature of 0 means greedy: treated as 1).
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)  # [B, T, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
    return logp, entropy


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, num_generations: int, scale: str = "group",
                     std_floor: float = 0.0, eps: float = 1e-4, estimator: str = "grpo",
                     lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages by `estimator` (module docstring). [B] rewards, [B] valid (0 = skipped sample) -> [B] advantages,
    [B/G] zero_std.

    Groups are consecutive blocks of `num_generations` completions of the same prompt. Skipped samples
    (reward None) take no part in any statistic and get advantage 0. A group whose rewards are all equal is
    flagged in `zero_std`; under the group-relative estimators its advantages are exactly 0.
    The grpo / grpo_passk divisor is max(std, std_floor) + eps: a floor keeps near-ties from becoming full-size
    advantages. `lengths` [B]: each completion's loss tokens, the weights of the REINFORCE++ whitening (verl's
    masked_whiten over tokens); None: one per completion.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"adv_estimator: unknown {estimator!r}; use one of {list(ESTIMATORS)}")
    r = torch.where(valid.bool(), rewards, 0.0).view(-1, num_generations).double()  # [P, G]
    v = valid.view(-1, num_generations).double()  # [P, G]
    n = v.sum(1, keepdim=True).clamp(min=1)
    mean = (r * v).sum(1, keepdim=True) / n  # [P, 1]
    var = (((r - mean) * v) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)  # unbiased, like torch.std
    spread = torch.where(v.bool(), r, -torch.inf).amax(1) - torch.where(v.bool(), r, torch.inf).amin(1)
    zero_std = ~(spread > 0)  # exact comparison: an fp "std" of 1e-9 must not become a huge advantage
    if estimator.startswith("reinforce_plus_plus"):  # a batch baseline: no group is forced to 0
        x = r if estimator == "reinforce_plus_plus" else r - mean
        w = v * (1.0 if lengths is None else lengths.view(-1, num_generations).double())
        adv = whiten(x, w) * v
        return adv.flatten().to(rewards.dtype), zero_std
    if scale == "group":
        denom = var.sqrt().clamp(min=std_floor) + eps
    elif scale == "batch":  # std over every valid completion of the batch (REINFORCE++-style)
        flat = r.flatten()[v.flatten().bool()]
        denom = (flat.std() if flat.numel() > 1 else torch.zeros((), dtype=r.dtype)).clamp(min=std_floor) + eps
    elif scale == "none":
        denom = torch.ones((), dtype=r.dtype)
    else:
        raise ValueError(f"scale_rewards: unknown {scale!r}; use one of {list(SCALE_REWARDS)}")
    if estimator == "grpo":
        adv = (r - mean) / denom * v
    elif estimator == "rloo":  # r_i - (sum - r_i) / (n - 1): leave-one-out, never divided
        adv = (r - (r * v).sum(1, keepdim=True).sub(r).div((n - 1).clamp(min=1))) * v
    else:  # grpo_passk: the best sample's margin over the second best; the others 0
        top = torch.where(v.bool(), r, -torch.inf).topk(2, dim=1)
        margin = torch.where(n[:, 0] > 1, top.values[:, 0] - top.values[:, 1], 0.0)[:, None]  # [P, 1]
        best = torch.zeros_like(r).scatter(1, top.indices[:, :1], 1.0)
        adv = best * margin / denom
    adv = torch.where(zero_std[:, None], 0.0, adv)
    return adv.flatten().to(rewards.dtype), zero_std


def whiten(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var weighted by w (verl's masked_whiten: w counts tokens)."""
    total = w.sum()
    mean = (x * w).sum() / total.clamp(min=1)
    var = ((x - mean) ** 2 * w).sum() / (total - 1).clamp(min=1)  # Bessel's correction over the tokens
    return (x - mean) * torch.rsqrt(var + eps)


def decoupled_rewards(per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                      eps: float = 1e-4) -> torch.Tensor:
    """GDPO's reward (multi_objective_aggregation normalize_then_sum): [B, K] rewards (NaN: that function gave
    none) -> [B] sum over k of w_k (r_ik - mean_k) / (std_k + eps), within each group; NaN where all K are NaN."""
    K = per_func.shape[1]
    grouped = per_func.double().view(-1, num_generations, K)  # [P, G, K]
    known = ~torch.isnan(grouped)
    count = known.sum(1, keepdim=True)
    mean = torch.where(known, grouped, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(known, grouped - mean, 0.0) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    z = torch.where(known, (grouped - mean) / (var.sqrt() + eps), 0.0) * weights.double()
    total = z.sum(-1).flatten()  # [B]
    return torch.where(known.any(-1).flatten(), total, torch.nan).to(per_func.dtype)


ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "grpo_passk")
SCALE_REWARDS = ("group", "batch", "none")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp; >= 0. [B, T]."""
    d = ref_logp - logp
    return torch.expm1(d) - d  # expm1 keeps k3 >= 0 near d = 0, where exp(d) - 1 loses precision


SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_correction(logp_old: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       clip_min: float = 0.0, clip_max: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights [B, T] for sampling with another implementation of the policy (module docstring), and
    the ratios they came from [B, T] (before truncation or masking).

    logp_old: the trainer's log-probs of the sampled tokens before any update; sampler_logp: the sampler's (NaN
    where it gave none: such a token has ratio 1 and stays out of its sequence's mean); mask: 1 on completion
    tokens. Weights are 0 on masked-out positions."""
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"vllm_importance_sampling_mode: unknown {mode!r}; use one of {list(SAMPLER_CORRECTIONS)}")
    known = mask.bool() & torch.isfinite(sampler_logp)
    log_ratio = torch.where(known, logp_old - sampler_logp, 0.0)  # [B, T]
    if mode.startswith("sequence"):
        log_ratio = masked_mean(log_ratio, known.float(), dim=1)[:, None].expand_as(log_ratio)  # [B, T]
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        weights = ratio.clamp(clip_min, clip_max)
    else:
        weights = torch.where((ratio < clip_min) | (ratio > clip_max), 0.0, ratio)
    return (weights * mask).detach(), ratio.detach()


@dataclass
class LossOut:
    """Per-token loss [B, T] and the per-token quantities logged from it."""
    per_token: torch.Tensor  # [B, T] loss before aggregation
    ratio: torch.Tensor  # [B, T] importance ratio (detached)
    clipped: torch.Tensor  # [B, T] 1 where the clip made the gradient 0 (cispo: where the weight was capped)
    kl: torch.Tensor | None  # [B, T] k3 (detached; times the ratio with use_bias_correction_kl) when beta > 0
    kept: torch.Tensor | None = None  # [B, 1] 0 for sequences the off-policy mask dropped


LOSS_MODES = ("vanilla", "cispo", "sapo", "vespo")
LOG_MIN_WEIGHT = math.log(1e-8)  # VESPO's clamp of log w (as its reference code)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                epsilon: float, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, level: str = "token", dual_clip: float | None = None,
                sampler_weights: torch.Tensor | None = None, loss_mode: str = "vanilla", delta: float | None = None,
                sapo_temperatures: tuple[float, float] = (1.0, 1.05),
                vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
                unbiased_kl: bool = False, off_policy_threshold: float | None = None,
                sampler_logp: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> LossOut:
    """The surrogate of `loss_mode` (+ beta * k3) per token. logp/old_logp/ref_logp/mask [B, T], advantages [B].

    The clip range is [1 - epsilon, 1 + epsilon_high] (epsilon_high None: epsilon); keyword-only, like every
    option here: two clip bounds side by side are too easy to swap. `sampler_weights` [B, T] (from
    `sampler_correction`) multiply the surrogate, not the KL term (vespo multiplies its sequence ratio by their
    product over the sequence's tokens instead: a per-token correction; config.py refuses the sequence modes).
    sapo_temperatures: (A > 0, A <= 0); vespo_params: (k_pos, lambda_pos, k_neg, lambda_neg).
    off_policy_threshold: drop sequences with A < 0 whose mean log(sampler / theta) is above it, the sampler's
    log-probs `sampler_logp` (NaN: unknown, old_logp used) or old_logp. token_mask [B, T]: the tokens kept by the
    entropy selection (`high_entropy_mask`)."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode: unknown {loss_mode!r}; use one of {list(LOSS_MODES)}")
    if epsilon_high is None:
        epsilon_high = epsilon
    m = mask.bool()
    # Masked positions are zeroed before any exp: an overflow there would give inf * 0 = NaN in the sums.
    token_log_ratio = torch.where(m, logp - old_logp, 0.0)  # [B, T]
    log_ratio = token_log_ratio
    if level == "sequence":  # GSPO: one ratio per sequence, the geometric mean of the token ratios
        seq = masked_mean(log_ratio, mask, dim=1)[:, None]  # [B, 1]
        log_ratio = seq.expand_as(logp)
    ratio = torch.exp(log_ratio)  # [B, T]
    A = advantages[:, None]  # [B, 1]
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if loss_mode == "vanilla":
        capped = ratio if delta is None else ratio.clamp(max=delta)  # INTELLECT-2's two-sided clip
        surr1 = capped * A
        surr2 = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A
        per_token = -torch.min(surr1, surr2)
        if dual_clip is not None:  # bound the loss of negative advantages when the ratio explodes
            per_token = torch.where(A < 0, torch.min(per_token, -dual_clip * A), per_token)
        clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
        if dual_clip is not None:
            clipped |= (A < 0) & (ratio > dual_clip)
        if delta is not None:
            clipped |= (A < 0) & (ratio > delta)
    elif loss_mode == "cispo":  # the weight is capped and carries no gradient: every token keeps its gradient
        per_token = -ratio.clamp(max=epsilon_high).detach() * A * logp
        clipped = (ratio > epsilon_high) & (A > 0)  # TRL's cispo_clip_ratio
    elif loss_mode == "sapo":  # a soft gate: slope 1 at ratio 1, fading as the ratio leaves it
        tau = torch.where(A > 0, A.new_tensor(sapo_temperatures[0]), A.new_tensor(sapo_temperatures[1]))
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A
    else:  # vespo: a Gamma-shaped weight of the whole sequence's ratio (a product, not a mean), no gradient
        log_w = (token_log_ratio.clamp(-20.0, 20.0) * mask).sum(1, keepdim=True)  # [B, 1]
        if sampler_weights is not None:  # the sampler's weights join the sequence ratio (in logs)
            log_w = log_w + (torch.log(sampler_weights).clamp(LOG_MIN_WEIGHT, 20.0) * mask).sum(1, keepdim=True)
        log_w = log_w.clamp(LOG_MIN_WEIGHT, 20.0).detach()
        k_pos, lam_pos, k_neg, lam_neg = vespo_params
        k = torch.where(A >= 0, A.new_tensor(k_pos), A.new_tensor(k_neg))
        lam = torch.where(A >= 0, A.new_tensor(lam_pos), A.new_tensor(lam_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token = -phi * A * logp
    kept = None
    if off_policy_threshold is not None:  # DeepSeek-V3.2: drop negative samples the policy has drifted far from
        behaviour = old_logp if sampler_logp is None else torch.where(torch.isfinite(sampler_logp), sampler_logp,
                                                                       old_logp)
        drift = masked_mean(torch.where(m, behaviour - logp.detach(), 0.0), mask, dim=1)[:, None]  # [B, 1]
        kept = ((A >= 0) | (drift <= off_policy_threshold)).to(per_token.dtype)
        per_token = per_token * kept
    if token_mask is not None:
        per_token = per_token * token_mask
    if sampler_weights is not None and loss_mode != "vespo":
        per_token = per_token * sampler_weights
    kl = None
    if beta > 0:
        assert ref_logp is not None, "beta > 0 needs reference log-probs"
        kl = kl_k3(logp, torch.where(m, ref_logp, logp))
        if unbiased_kl:  # DeepSeek-V3.2: k3 weighted by pi_theta / pi_old, unbiased for samples of pi_old
            kl = kl * ratio
        per_token = per_token + beta * kl
        kl = kl.detach()
    return LossOut(per_token, ratio.detach(), clipped.float(), kl, kept)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float,
                      pooled: torch.Tensor | None = None) -> torch.Tensor:
    """1 on valid tokens whose entropy is >= the (1 - quantile) quantile of the valid entropies (`pooled`: those
    of every process, default this batch's): the top `quantile` of tokens; 0 keeps only the highest. [B, T]."""
    values = (entropy.detach()[mask.bool()] if pooled is None else pooled).to(entropy.dtype)  # compared as is
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1 - quantile)
    return ((entropy.detach() >= threshold) & mask.bool()).to(mask.dtype)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, norm: Norm) -> torch.Tensor:
    """This micro-batch's share of the bonus: the sum of its entropies over `mask` (the tokens kept) / the batch's
    active tokens, under every loss_type (TRL's dapo / cispo / vespo form; TRL's grpo-style losses divide by the
    kept tokens instead: with top_entropy_quantile rho < 1 this bonus is ~rho times theirs). Subtracted from the
    loss times entropy_coef."""
    return (entropy * mask).sum() / max(norm.num_tokens, 1)


@dataclass
class EntropyControl:
    """The entropy coefficient, fixed or adaptive (Skywork-OR1): `update` after each optimizer step with the
    batch's mean entropy over the selected tokens; `applied` is the coefficient of the next update."""
    coef: float
    adaptive: bool = False
    target: float = 0.2
    step: float = 0.005
    low: float = 0.0
    high: float = 1.0
    last_entropy: float = math.inf  # inf: no bonus until the first measurement (adaptive)

    def applied(self) -> float:
        if not self.adaptive:
            return self.coef
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> None:
        if self.adaptive:
            self.coef = min(self.coef + self.step, self.high) if entropy <= self.target else \
                max(self.coef - self.step, self.low)
            self.last_entropy = entropy


@dataclass
class Norm:
    """Counts over the whole accumulated batch that make micro-batch losses add up to the batch loss."""
    num_sequences: int  # completions in the accumulated batch
    num_tokens: int  # active (masked-in) completion tokens in the accumulated batch
    num_micro_batches: int
    max_completion_length: int


def agg_grpo(per_token: torch.Tensor, mask: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Mean over each sequence's tokens, then mean over the batch's sequences (DeepSeekMath)."""
    return masked_mean(per_token, mask, dim=1).sum() / norm.num_sequences


def agg_bnpo(per_token: torch.Tensor, mask: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Mean over the micro-batch's active tokens, averaged over micro-batches (TRL's bnpo)."""
    return masked_mean(per_token, mask) / norm.num_micro_batches


def agg_dr_grpo(per_token: torch.Tensor, mask: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Sum over tokens / (sequences * max_completion_length): a constant denominator (Dr. GRPO)."""
    return (per_token * mask).sum() / (norm.num_sequences * norm.max_completion_length)


def agg_dapo(per_token: torch.Tensor, mask: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Sum over tokens / active tokens of the whole accumulated batch (DAPO token-level loss)."""
    return (per_token * mask).sum() / max(norm.num_tokens, 1)


def agg_luspo(per_token: torch.Tensor, mask: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Sum over tokens / sequences: each sequence's (sequence-level) loss weighted by its length (LUSPO)."""
    return (per_token * mask).sum() / norm.num_sequences


LOSS_TYPES = {"grpo": agg_grpo, "bnpo": agg_bnpo, "dr_grpo": agg_dr_grpo, "dapo": agg_dapo, "luspo": agg_luspo}
# TRL's loss_type values that name a surrogate: the loss_mode and the aggregation TRL uses with it (config.py)
TRL_LOSS_TYPES = {"cispo": ("cispo", "dapo"), "sapo": ("sapo", "grpo"), "vespo": ("vespo", "dapo")}
