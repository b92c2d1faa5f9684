"""The engine's own decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3; SmolLM2 is a Llama).

One token per row through the model's own weights, without transformers' forward around it: no mask builder,
no output dataclasses, no per-module hooks, and attention for a single query computed as two batched matrix
products per layer with the query heads grouped over their KV head (no repeated K/V). On a 2-core CPU that
forward's bookkeeping is most of a decode step for a small model (tiny-arith: ~1.5 ms of ~2 ms) and the mask
handling a fifth of SmolLM2-135M's attention. The arithmetic is transformers' own, op for op (RMSNorm in float32,
the rotation, the MLP), so greedy decoding still gives `generate`'s tokens (tests/unit/test_engine.py); only the
softmax's summation order differs from SDPA's (~1e-7).

Used by the engine when `compat.decoder_parts` recognises the model (`engine_decode: auto` or `plain`); any other
model, or one with forward hooks of its own, decodes through transformers' forward, as with `engine_decode: hf`.
Prefill stays transformers': its KV cache is each prompt's shared prefix (SharedPrefixKV); the completions' keys
and values go to buffers of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from minigrpo.compat import DecoderParts, decoder_parts, mkl_packed_linear


def linear(module: torch.nn.Module, packed_rows: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain Linear as one call without the module's overhead: MKL's packed GEMM for float32 on a CPU when
    `packed_rows` (the batch it is packed for) is given (compat.mkl_packed_linear), else F.linear; anything
    else (a LoRA or quantized layer) is called as it is."""
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        fast = mkl_packed_linear(module, packed_rows) if packed_rows else None
        if fast is not None:
            return fast
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op: in float32, then back to the input dtype, times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on one tensor [b, heads, D] (cos, sin: [b, 1, D])."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def own_dtype(keys: torch.Tensor) -> torch.dtype:
    """The dtype of the completions' KV buffers: float32 on a CPU, the prefill's elsewhere (minigrpo plan counts
    the same)."""
    return torch.float32 if keys.device.type == "cpu" else keys.dtype


class SharedPrefixKV:
    """The KV cache of a native decode: each prompt's keys and values once ([prompts, K, P, D], from the prefill:
    not copied to its n samples), and each row's own completion columns ([rows, K, T, D], allocated once,
    written in place). A decode step reads a prompt's prefix once for its n rows (one matrix product with n x G
    query rows, as cascade / Hydragen attention does), so the prompt's part of the cache is read n times less than
    from a cache expanded to every row; rows that finish leave the completion part (`batch_select_indices`)."""

    def __init__(self, cache, prompt_mask: torch.Tensor, n: int, max_new_tokens: int) -> None:
        self.prefix = [(layer.keys.contiguous(), layer.values.contiguous()) for layer in cache.layers]
        P, B = prompt_mask.shape[0], prompt_mask.shape[0] * n
        keys = self.prefix[0][0]
        # additive mask of each prompt's padding, in the step's grouped layout [P, 1, 1, L]
        self.prefix_bias = torch.zeros(prompt_mask.shape, device=keys.device).masked_fill(
            prompt_mask == 0, -torch.inf)[:, None, None]
        # float32 on a CPU whatever the weights: products with a slice of a bfloat16 buffer copy it first there
        # (half a bfloat16 step's attention time), float32 ones read it in place; the weights' dtype elsewhere
        shape, dtype = (B, keys.shape[1], max_new_tokens, keys.shape[3]), own_dtype(keys)
        self.own = [(keys.new_empty(shape, dtype=dtype), keys.new_empty(shape, dtype=dtype)) for _ in self.prefix]
        self.n, self.prompts, self.length = n, P, 0

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (finished rows leave), in the engine's order; one layer at a time, so the copy
        costs one layer's memory."""
        for i, (k, v) in enumerate(self.own):
            self.own[i] = (k[keep], v[keep])


class NativeDecoder:
    """`step(tokens, position, live, kv)`: the next-token logits of each row still decoding, extending `kv`
    (SharedPrefixKV) by one column."""

    def __init__(self, parts: DecoderParts, packed_rows: int = 0) -> None:
        self.parts = parts
        self.layers = [(*(linear(m, packed_rows) for m in (p.q, p.k, p.v, p.o, p.gate, p.up, p.down)), p.norm_in,
                        p.norm_post, p.q_norm, p.k_norm) for p in parts.layers]
        self.head = linear(parts.lm_head, packed_rows)

    @classmethod
    def of(cls, model: torch.nn.Module, packed_rows: int = 0) -> tuple[NativeDecoder | None, str]:
        """The decoder for `model` (its float32 linear layers packed for MKL for `packed_rows` rows when given, on
        a CPU), or None and why transformers' forward is used instead."""
        parts, why = decoder_parts(model)
        return (cls(parts, packed_rows), "") if parts is not None else (None, why)

    def step(self, tokens: torch.Tensor, position: torch.Tensor, live: torch.Tensor, kv: SharedPrefixKV,
             ) -> torch.Tensor:
        """tokens [b], position [b, 1], live [b] (each row's index among the prompts x n rows) -> logits [b, V]."""
        p = self.parts
        b, H, K, D, n, t = tokens.shape[0], p.heads, p.kv_heads, p.head_dim, kv.n, kv.length
        G, B, whole = H // K, kv.prompts * kv.n, tokens.shape[0] == kv.prompts * kv.n  # whole: no row has left

        def grouped(x: torch.Tensor) -> torch.Tensor:  # [b, K, G, X] -> [prompts, K, n * G, X]
            if not whole:
                x = x.new_zeros((B, *x.shape[1:])).index_copy_(0, live, x)
            X = x.shape[-1]
            return x.view(kv.prompts, n, K, G, X).transpose(1, 2).reshape(kv.prompts, K, n * G, X)

        def rowwise(x: torch.Tensor) -> torch.Tensor:  # [prompts, K, n * G, X] -> [b, K, G, X]
            X = x.shape[-1]
            x = x.view(kv.prompts, K, n, G, X).transpose(1, 2).reshape(B, K, G, X)
            return x if whole else x[live]

        x = p.embed(tokens)  # [b, hidden]
        cos, sin = p.rotary(x[:, None], position)  # [b, 1, D]
        for (q_proj, k_proj, v_proj, o_proj, gate, up, down, norm_in, norm_post, q_norm, k_norm), \
                (prefix_k, prefix_v), (own_k, own_v) in zip(self.layers, kv.prefix, kv.own):
            h = rms_norm(x, norm_in)
            q, k, v = q_proj(h).view(b, H, D), k_proj(h).view(b, K, D), v_proj(h).view(b, K, D)
            if q_norm is not None:
                q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            own_k[:, :, t], own_v[:, :, t] = k, v
            q = q.view(b, K, G, D)
            shared = torch.matmul(grouped(q), prefix_k.transpose(-1, -2)) * p.scaling + kv.prefix_bias
            own = torch.matmul(q.float(), own_k[:, :, :t + 1].transpose(-1, -2)) * p.scaling
            weights = torch.softmax(torch.cat([rowwise(shared).float(), own], -1), -1)  # [b, K, G, P + t + 1]
            P = prefix_k.shape[2]
            attn = rowwise(torch.matmul(grouped(weights[..., :P].to(q.dtype)), prefix_v)) + \
                torch.matmul(weights[..., P:], own_v[:, :, :t + 1])  # [b, K, G, D]
            x = x + o_proj(attn.reshape(b, H * D).to(x.dtype))
            h = rms_norm(x, norm_post)
            x = x + down(F.silu(gate(h)) * up(h))
        kv.length += 1
        return self.head(rms_norm(x, p.norm))
