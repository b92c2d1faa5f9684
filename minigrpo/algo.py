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
micro-batch contributes its share, so accumulation gives the same gradient as one big batch):

    grpo     mean over each sequence's tokens, then mean over sequences     (DeepSeekMath; length bias)
    bnpo     sum over the micro-batch's tokens / its active tokens            (per micro-batch, as TRL)
    dr_grpo  sum / (num sequences * max_completion_length)                  (Dr. GRPO, constant denominator)
    dapo     sum / active tokens of the whole accumulated batch             (DAPO, Yu et al. 2025; default)

Options: clip-higher (`epsilon_high` > `epsilon`, DAPO); dual-clip (Ye et al. 2020): for A < 0 the loss
is capped at -c * A so a huge ratio cannot blow it up; `std_floor` on the advantage divisor.

Sampler correction (`sampler_correction`, rollout_backend vllm): vLLM's log-probs of the tokens it sampled differ
from the trainer's by numerics (other kernels, precisions), so the samples come from a slightly different policy
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"). The surrogate of each
token is weighted by w = exp(logp_old - logp_sampler), per token or per sequence (exp of the mean over its tokens:
the geometric mean, as GSPO's ratio; a sum would shrink long sequences' weights), then truncated to
[clip_min, clip_max] (TIS) or set to 0 outside it (MIS: "When speed kills stability", 2025; IcePop):
    L_it = w_it * L_clip_it + beta * k3_it
"""

from __future__ import annotations

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
                     std_floor: float = 0.0, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages. [B] rewards, [B] valid (0 = skipped sample) -> [B] advantages, [B/G] zero_std.

    Groups are consecutive blocks of `num_generations` completions of the same prompt. Skipped samples
    (reward None) take no part in their group's statistics and get advantage 0. A group whose rewards are
    all equal carries no signal: its advantages are exactly 0 and it is flagged in `zero_std`.
    The divisor is max(std, std_floor) + eps: a floor keeps near-ties from becoming full-size advantages.
    """
    r = torch.where(valid.bool(), rewards, 0.0).view(-1, num_generations).double()  # [P, G]
    v = valid.view(-1, num_generations).double()  # [P, G]
    n = v.sum(1, keepdim=True).clamp(min=1)
    mean = (r * v).sum(1, keepdim=True) / n  # [P, 1]
    var = (((r - mean) * v) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)  # unbiased, like torch.std
    spread = torch.where(v.bool(), r, -torch.inf).amax(1) - torch.where(v.bool(), r, torch.inf).amin(1)
    zero_std = ~(spread > 0)  # exact comparison: an fp "std" of 1e-9 must not become a huge advantage
    if scale == "group":
        denom = var.sqrt().clamp(min=std_floor) + eps
    elif scale == "batch":  # std over every valid completion of the batch (REINFORCE++-style)
        flat = r.flatten()[v.flatten().bool()]
        denom = (flat.std() if flat.numel() > 1 else torch.zeros((), dtype=r.dtype)).clamp(min=std_floor) + eps
    elif scale == "none":
        denom = torch.ones((), dtype=r.dtype)
    else:
        raise ValueError(f"scale_rewards: unknown {scale!r}; use one of {list(SCALE_REWARDS)}")
    adv = (r - mean) / denom * v
    adv = torch.where(zero_std[:, None], 0.0, adv)
    return adv.flatten().to(rewards.dtype), zero_std


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
    clipped: torch.Tensor  # [B, T] 1 where the clip made the gradient 0
    kl: torch.Tensor | None  # [B, T] k3 (detached) when beta > 0


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                epsilon: float, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, level: str = "token", dual_clip: float | None = None,
                sampler_weights: torch.Tensor | None = None) -> LossOut:
    """Clipped surrogate (+ beta * k3) per token. logp/old_logp/ref_logp/mask [B, T], advantages [B].

    The clip range is [1 - epsilon, 1 + epsilon_high] (epsilon_high None: epsilon); keyword-only, like every
    option here: two clip bounds side by side are too easy to swap. `sampler_weights` [B, T] (from
    `sampler_correction`) multiply the surrogate, not the KL term."""
    if epsilon_high is None:
        epsilon_high = epsilon
    m = mask.bool()
    # Masked positions are zeroed before any exp: an overflow there would give inf * 0 = NaN in the sums.
    log_ratio = torch.where(m, logp - old_logp, 0.0)  # [B, T]
    if level == "sequence":  # GSPO: one ratio per sequence, the geometric mean of the token ratios
        seq = masked_mean(log_ratio, mask, dim=1)[:, None]  # [B, 1]
        log_ratio = seq.expand_as(logp)
    ratio = torch.exp(log_ratio)  # [B, T]
    A = advantages[:, None]  # [B, 1]
    surr1 = ratio * A
    surr2 = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A
    per_token = -torch.min(surr1, surr2)
    if dual_clip is not None:  # bound the loss of negative advantages when the ratio explodes
        per_token = torch.where(A < 0, torch.min(per_token, -dual_clip * A), per_token)
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
    if dual_clip is not None:
        clipped |= (A < 0) & (ratio > dual_clip)
    if sampler_weights is not None:
        per_token = per_token * sampler_weights
    kl = None
    if beta > 0:
        assert ref_logp is not None, "beta > 0 needs reference log-probs"
        kl = kl_k3(logp, torch.where(m, ref_logp, logp))
        per_token = per_token + beta * kl
        kl = kl.detach()
    return LossOut(per_token, ratio.detach(), clipped.float(), kl)


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


LOSS_TYPES = {"grpo": agg_grpo, "bnpo": agg_bnpo, "dr_grpo": agg_dr_grpo, "dapo": agg_dapo}
