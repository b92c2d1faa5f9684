"""The engine's own decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3; SmolLM2 is a Llama).

One token per row through the model's own weights, without transformers' forward around it: no mask builder,
no output dataclasses, no per-module hooks. On a 2-core CPU that forward's bookkeeping is most of a decode step for
a small model (tiny-arith: ~1.5 ms of ~2 ms) and the mask handling a fifth of SmolLM2-135M's attention. The
arithmetic is transformers' own (RMSNorm in float32, the rotation, the MLP), so greedy decoding gives `generate`'s
tokens (tests/unit/test_decode.py) but for float32 rounding: the softmax's summation order, the matrix kernels MKL
picks by shape and a norm's weight folded into the next product's weights may differ (~1e-7 relative), which
decides only a near-tie.

What makes it fast, each measured (BENCHMARKS.md, issue 23):
- products (`products`, `product_layout`): those reading the same input fused into one (q/k/v; gate/up) on a
  copy of their weights made per call (the weights change every step): MKL's packed layout for a model whose
  weights stream from memory (compat.mkl_packed_linear), a plain [in, out] layout for one that stays in cache,
  with the norm's weight folded into its rows and the residual added by the product itself;
- attention: two cache layouts (`kv_layout`): a prompt's keys read once for its n samples (SharedPrefixKV, two
  batched products with the query heads grouped over their KV head) where that prefix is large, and two batched
  products and a softmax over each row's own copy, its keys kept transposed (ExpandedKV), where the calls would cost
  more than re-reading a small prefix;
- the engine runs this step under torch.inference_mode (no autograd bookkeeping: ~14% of a tiny model's step);
- [in, out] copies of frozen weights (LoRA's base layers) kept between generations (`transposed_weights`).
At a tiny model's shapes each torch call costs 1-3 us and the products are a third to a half of a step: what is
left is calls (~40 a layer), so each one saved counts.

Used by the engine when `compat.decoder_parts` recognises the model (`engine_decode: auto` or `plain`: the
weights as they are, one product per module, no copy), for the prompts' pass (`NativeDecoder.prefill`) and each
token's; any other model, or one with forward hooks of its own, runs through transformers' forward, as with
`engine_decode: hf`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minigrpo.compat import DecoderParts, decoder_parts, mkl_packed_linear, tensor_version

Product = Callable[..., torch.Tensor]  # (x [b, in], residual [b, out] or None) -> residual + the products
# a decoder whose linear weights total less than this stays in the CPU's caches between steps: its products run
# on plain [in, out] copies (8 x 128 @ 128 x 384: 5.0 us as MKL packed, 2.6 as a plain product); above it they
# stream from memory, where the packed layout is faster (SmolLM2-135M's layers: 2.1 s packed vs 2.7 s plain)
CACHED_WEIGHT_BYTES = 32 * 2**20
# ExpandedKV when re-reading the prompts' keys and values for every sample costs less than this a layer (bytes):
# about what SharedPrefixKV's ~25 extra calls a layer cost on this project's CPUs (~60 us at ~14 GB/s)
EXPAND_BYTES = 2**20


# [in, out] copies (`products`) of frozen weights (requires_grad off: LoRA's base layers, the norms), by first module,
# kept while every tensor they were made from lives unchanged (its identity and version counter): tiny-arith's
# untouched MLP was transposed again at every generation (~3 GB/s from memory: 2.5 ms of a 35 ms generation).
# Merged LoRA weights live for one generation, and an entry made from one with it.
_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transposed_weights(modules: list[torch.nn.Module], scale: torch.Tensor | None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The modules' weights as one [in, out] matrix (`scale` folded into its rows) and their biases, side by side."""
    tensors = [m.weight for m in modules] + [m.bias for m in modules if m.bias is not None]
    tensors += [] if scale is None else [scale]
    # (an inference tensor has no version counter: never kept)
    frozen = not any(t.requires_grad or t.is_inference() for t in tensors)
    cached = _FROZEN.get(modules[0]) if frozen else None
    if cached is not None and len(cached[0]) == len(tensors) and all(
            ref() is t and version == tensor_version(t) for (ref, version), t in zip(cached[0], tensors)):
        return cached[1], cached[2]
    first = modules[0].weight
    bias = None if all(m.bias is None for m in modules) else torch.cat(
        [m.bias.detach() if m.bias is not None else first.new_zeros(m.out_features) for m in modules])
    weight = first.detach().t()
    if len(modules) > 1 or scale is not None or not weight.is_contiguous():  # (merged LoRA may be [in, out])
        weight = torch.cat([m.weight.detach().t() for m in modules], 1)  # [in, out], one copy
    if scale is not None:
        weight.mul_(scale.detach()[:, None])
    if frozen:
        module = weakref.ref(modules[0])

        def drop(_: weakref.ref) -> None:  # one of the tensors died: so does the entry made from it
            if module() is not None and _FROZEN.get(module()) is entry:
                del _FROZEN[module()]
        entry = ([(weakref.ref(t, drop), tensor_version(t)) for t in tensors], weight, bias)
        _FROZEN[modules[0]] = entry
    return weight, bias


def _plain(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


def products(modules: list[torch.nn.Module], layout: str, rows: int, scale: torch.Tensor | None = None) -> Product:
    """(x [b, in], residual [b, out] or None) -> the outputs of `modules` (Linears reading the same input) at
    x * `scale` (an RMSNorm's weight [in], or None) side by side [b, sum of outs], plus `residual` when given.

    layout "transposed": one product on a copy of the modules' weights stacked as one [in, out] matrix, `scale`
    folded into its rows and the residual added by the same call (torch.addmm): F.linear hands MKL a transposed
    operand, twice slower at a tiny model's shapes, and each call saved is ~1-2 us. "packed" (float32 on a CPU,
    with MKL): each module's weight as MKL's packed GEMM for `rows` rows (a batch of fewer rows, once some have
    finished, is padded to them: the packed kernel otherwise hands back to F.linear, a third slower; a larger one,
    the prefill's, does), the outputs concatenated: a packed copy of each weight and nothing more. Both compute
    F.linear's dot products, within float32 rounding (MKL picks its kernel by shape). "plain", or modules other
    than plain Linears (LoRA, quantized): each module called."""
    if layout == "transposed" and all(_plain(m) for m in modules):
        weight, bias = transposed_weights(modules, scale)

        def product(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
            if residual is None:
                return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
            return torch.addmm(residual, x, weight) if bias is None else residual + torch.addmm(bias, x, weight)
        return product
    packed = [mkl_packed_linear(m.weight, m.bias, rows) for m in modules] if layout == "packed" and all(
        _plain(m) for m in modules) else [None]  # (a LoRA layer's .weight is its base layer's: called instead)
    if all(c is not None for c in packed):
        def call(x: torch.Tensor) -> torch.Tensor:
            full = x if x.shape[0] >= rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))
            out = packed[0](full) if len(packed) == 1 else torch.cat([c(full) for c in packed], -1)
            return out if full is x else out[:x.shape[0]]
    else:
        calls = [m if not _plain(m) else (lambda x, m=m: F.linear(x, m.weight, m.bias)) for m in modules]

        def call(x: torch.Tensor) -> torch.Tensor:
            return calls[0](x) if len(calls) == 1 else torch.cat([c(x) for c in calls], -1)

    def scaled(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = call(x if scale is None else scale * x)
        return out if residual is None else residual + out
    return scaled


def product_layout(weights: list[torch.Tensor], fast: bool) -> str:
    """The layout of a decoder's products (`products`) over its linear `weights`: for float32 weights on a CPU
    under `fast` (engine_decode auto), "packed" when they outgrow the caches, else "transposed"; "plain"
    otherwise (bfloat16's kernels give other roundings on another layout, and no faster ones)."""
    if not fast or weights[0].device.type != "cpu" or weights[0].dtype != torch.float32:
        return "plain"
    return "packed" if sum(w.numel() * w.element_size() for w in weights) > CACHED_WEIGHT_BYTES else "transposed"


def rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor | None, float]) -> torch.Tensor:
    """transformers' LlamaRMSNorm (norm: its weight, or None where the next products hold it, and epsilon): in
    float32, then back to the input dtype, times the weight. Not torch's F.rms_norm: its CPU kernel reduces
    in double, so where x^2 overflows float32 (weights that blew up) it returns finite values where transformers'
    gives NaN, and the engine's broken-weights check must see what transformers' forward would."""
    weight, eps = norm
    h = x if x.dtype == torch.float32 else x.float()  # (no-op calls are still calls: 9 norms a decode step)
    h = h * (h * h).mean(-1, keepdim=True).add_(eps).rsqrt_()
    h = h if x.dtype == torch.float32 else h.to(x.dtype)
    return h if weight is None else weight * h


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on [b, heads, D] (cos, sin: [b, 1, D]): x * cos + rotate_half(x) * sin,
    with rotate_half(x) * sin = roll(x, D / 2) * signed_sin (sin with its first half negated): the same products."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def half_sign(head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """[-1] * D/2 + [1] * D/2 (as `like`): sin times it makes `rotate`'s signed sin."""
    half = head_dim // 2
    return torch.cat([-torch.ones(half), torch.ones(half)]).to(like)


def causal_with_padding(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] (1 on real tokens) -> the boolean attention mask [B, 1, S, S]: each token sees the real tokens up to
    itself, and padding sees itself (finite values nothing reads, where no allowed key would give NaN)."""
    S = mask.shape[1]
    eye = torch.eye(S, dtype=torch.bool, device=mask.device)
    return (eye.logical_not().tril() & mask.bool()[:, None, :] | eye)[:, None]


def own_dtype(keys: torch.Tensor) -> torch.dtype:
    """The dtype of the completions' KV buffers: float32 on a CPU, the prefill's elsewhere (minigrpo plan counts
    the same)."""
    return torch.float32 if keys.device.type == "cpu" else keys.dtype


def kv_layout(rows: int, prompts: int, prompt_len: int, kv_dim: int) -> str:
    """"expanded" (ExpandedKV) when copying each prompt's keys and values to its n rows adds less than
    EXPAND_BYTES to what a layer reads per step (kv_dim = KV heads x head_dim; float32), else "shared"."""
    return "expanded" if (rows - prompts) * prompt_len * kv_dim * 2 * 4 <= EXPAND_BYTES else "shared"


class SharedPrefixKV:
    """The KV cache of a native decode: each prompt's keys and values once ([prompts, K, P, D], from the prefill:
    not copied to its n samples), and each row's own completion columns ([rows, K, T, D], allocated once,
    written in place). A decode step reads a prompt's prefix once for its n rows (one matrix product with n x G
    query rows, as cascade / Hydragen attention does), so the prompt's part of the cache is read n times less than
    from a cache expanded to every row; rows that finish leave the completion part (`batch_select_indices`)."""

    def __init__(self, prefill: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask: torch.Tensor, n: int,
                 max_new_tokens: int) -> None:
        self.prefix = [(k.contiguous(), v.contiguous()) for k, v in prefill]
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

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Layer i's attention for one new token a row: q [b, H, D], k / v [b, K, D] (stored) -> [b, H, D] (float32
        on a CPU); live: each row's index among the prompts x n rows."""
        (prefix_k, prefix_v), (own_k, own_v), t = self.prefix[i], self.own[i], self.length
        b, H, D = q.shape
        K, n = k.shape[1], self.n
        G, B = H // K, self.prompts * n
        whole = b == B  # no row has left

        def grouped(x: torch.Tensor) -> torch.Tensor:  # [b, K, G, X] -> [prompts, K, n * G, X]
            if not whole:
                x = x.new_zeros((B, *x.shape[1:])).index_copy_(0, live, x)
            X = x.shape[-1]
            return x.view(self.prompts, n, K, G, X).transpose(1, 2).reshape(self.prompts, K, n * G, X)

        def rowwise(x: torch.Tensor) -> torch.Tensor:  # [prompts, K, n * G, X] -> [b, K, G, X]
            X = x.shape[-1]
            x = x.view(self.prompts, K, n, G, X).transpose(1, 2).reshape(B, K, G, X)
            return x if whole else x[live]

        own_k[:, :, t], own_v[:, :, t] = k, v
        q = q.reshape(b, K, G, D)
        shared = torch.matmul(grouped(q), prefix_k.transpose(-1, -2)) * scaling + self.prefix_bias
        own = torch.matmul(q.to(own_k.dtype), own_k[:, :, :t + 1].transpose(-1, -2)) * scaling
        weights = torch.softmax(torch.cat([rowwise(shared).float(), own.float()], -1), -1)  # [b, K, G, P + t + 1]
        P = prefix_k.shape[2]
        return (rowwise(torch.matmul(grouped(weights[..., :P].to(q.dtype)), prefix_v)) +
                torch.matmul(weights[..., P:].to(own_v.dtype), own_v[:, :, :t + 1])).view(b, H, D)


class ExpandedKV:
    """The KV cache of a native decode where prompts are short and models small: each row's copy of its prompt's
    keys and values ahead of its own completion columns (allocated once for P + T columns), read with two batched
    products and a softmax a layer (scores with the padding mask added, weights, values): ~25 calls a layer fewer
    than SharedPrefixKV, for re-reading each prompt's part n times (kv_layout chooses). The keys are kept transposed
    ([rows x K, D, P + T]) so that both products read the buffers in place: 18 us a layer where
    scaled_dot_product_attention took 32 (8 rows, 2 KV heads of 2 queries, 60 columns). Buffers of another dtype
    than float32 (bfloat16 on a GPU) go through scaled_dot_product_attention, which computes in float32 within."""

    def __init__(self, prefill: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask: torch.Tensor, n: int,
                 max_new_tokens: int) -> None:
        keys = prefill[0][0]
        P, B, dtype = prompt_mask.shape[1], prompt_mask.shape[0] * n, own_dtype(keys)
        K, D, S = keys.shape[1], keys.shape[3], P + max_new_tokens
        self.own = []
        for keys_, values in prefill:
            k, v = keys.new_empty((B, K, D, S), dtype=dtype), keys.new_empty((B, K, S, D), dtype=dtype)
            k[..., :P], v[:, :, :P] = keys_.transpose(-1, -2).repeat_interleave(n, 0), values.repeat_interleave(n, 0)
            self.own.append((k, v))
        # additive mask of each row's prompt padding, per KV head [rows, K, 1, P + T]
        self.bias = torch.zeros((B, K, 1, S), device=keys.device, dtype=dtype)
        self.bias[..., :P].masked_fill_(prompt_mask.repeat_interleave(n, 0)[:, None, None] == 0, -torch.inf)
        self.prompt_len, self.length = P, 0
        self._flat()

    def _flat(self) -> None:
        """The buffers as the products read them: [rows x K, D, P + T] keys, [rows x K, P + T, D] values, [rows x K,
        1, P + T] mask (views, made once instead of at every layer of every step)."""
        B, K, D, S = self.own[0][0].shape
        self.flat = [(k.view(B * K, D, S), v.view(B * K, S, D)) for k, v in self.own]
        self.flat_bias = self.bias.view(B * K, 1, S)

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep`, as SharedPrefixKV does."""
        self.bias = self.bias[keep]
        for i, (k, v) in enumerate(self.own):
            self.own[i] = (k[keep], v[keep])
        self._flat()

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """As SharedPrefixKV.attend."""
        (own_k, own_v), (keys, values), L = self.own[i], self.flat[i], self.prompt_len + self.length + 1
        own_k.select(3, L - 1).copy_(k)
        own_v.select(2, L - 1).copy_(v)
        b, K, D, _ = own_k.shape
        if keys.dtype != torch.float32:
            return F.scaled_dot_product_attention(q[:, :, None].to(keys.dtype), own_k[..., :L].transpose(-1, -2),
                                                  own_v[:, :, :L], attn_mask=self.bias[:, :1, :, :L], scale=scaling,
                                                  enable_gqa=q.shape[1] != K)[:, :, 0]
        q = q.reshape(b * K, -1, D)  # float32 buffers on a CPU, whatever the weights (own_dtype)
        scores = torch.baddbmm(self.flat_bias[..., :L], q if q.dtype == keys.dtype else q.to(keys.dtype),
                               keys[..., :L], alpha=scaling)  # [b x K, G, L]
        return torch.bmm(torch.softmax(scores, -1), values[:, :L]).view(b, -1, D)


def make_kv(prefill: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask: torch.Tensor, n: int,
            max_new_tokens: int) -> SharedPrefixKV | ExpandedKV:
    """The native decode's cache from the prompts' keys and values ([prompts, K, P, D] per layer: `prefill`), their
    mask [prompts, P], n rows a prompt."""
    keys = prefill[0][0]
    layout = kv_layout(prompt_mask.shape[0] * n, prompt_mask.shape[0], prompt_mask.shape[1],
                       keys.shape[1] * keys.shape[3])
    return (ExpandedKV if layout == "expanded" else SharedPrefixKV)(prefill, prompt_mask, n, max_new_tokens)


class NativeDecoder:
    """`step(tokens, position, live, kv)`: the next-token logits of each row still decoding, extending `kv`
    (make_kv) by one column. Built per generation (the weights change every step): the products' copies
    (`products`), the norms' weights and the rotation's angles for `positions` positions read once."""

    def __init__(self, parts: DecoderParts, rows: int = 0, positions: int = 0) -> None:
        linears = [m for p in parts.layers for m in (p.q, p.k, p.v, p.o, p.gate, p.up, p.down)] + [parts.lm_head]
        self.parts = parts
        self.layout = product_layout([m.weight for m in linears if _plain(m)] or [parts.lm_head.weight], rows > 0)

        def fuse(*modules: torch.nn.Module, norm: torch.nn.Module | None = None) -> Product:
            return products(list(modules), self.layout, rows, None if norm is None else norm.weight)

        def norm(module: torch.nn.Module | None, weight: bool = True) -> tuple[torch.Tensor | None, float] | None:
            return None if module is None else (module.weight if weight else None, module.variance_epsilon)

        # a LoRA (unmerged) or quantized layer is called as a module: its dropout then needs the model in eval mode
        self.calls_modules = not all(_plain(m) for m in linears)
        # the norms before products hand their weights to them (`products`' scale); the per-head ones keep theirs
        self.layers = [(fuse(p.q, p.k, p.v, norm=p.norm_in), fuse(p.o), fuse(p.gate, p.up, norm=p.norm_post),
                        fuse(p.down), norm(p.norm_in, False), norm(p.norm_post, False), norm(p.q_norm),
                        norm(p.k_norm)) for p in parts.layers]
        self.norm, self.head = norm(parts.norm, False), fuse(parts.lm_head, norm=parts.norm)
        self.embedding = parts.embed.weight
        device = self.embedding.device
        self.sign = half_sign(parts.head_dim, self.embedding)  # rotate_half's, on sin
        self.angles = None  # cos, signed sin [positions, D]: one lookup a step instead of the rotary module
        if positions and parts.rope_static:
            cos, sin = parts.rotary(self.embedding[:1, None], torch.arange(positions, device=device)[None])
            self.angles = cos[0], sin[0] * self.sign.to(sin.dtype)

    @classmethod
    def of(cls, model: torch.nn.Module, rows: int = 0, positions: int = 0) -> tuple[NativeDecoder | None, str]:
        """The decoder for `model`, its products laid out for `rows` rows when given (`product_layout`; 0: the
        weights as they are) and its angles tabled for positions below `positions` (0: computed each step), or
        None and why transformers' forward is used instead."""
        parts, why = decoder_parts(model)
        return (cls(parts, rows, positions), "") if parts is not None else (None, why)

    def _angles(self, x: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [N, 1, D] of each token's position (position: [N] or [b, 1], as the tokens x [N, hidden])."""
        if self.angles is not None:
            return self.angles[0][position.reshape(-1)][:, None], self.angles[1][position.reshape(-1)][:, None]
        cos, sin = self.parts.rotary(x[None], position.reshape(1, -1))
        return cos[0][:, None], (sin * self.sign.to(sin.dtype))[0][:, None]

    def _qkv(self, x: torch.Tensor, layer: tuple, cos: torch.Tensor, sin: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's rotated queries [N, H, D], rotated keys and values [N, K, D] of `layer` (x: [N, hidden])."""
        qkv_proj, _, _, _, norm_in, _, q_norm, k_norm = layer
        H, K, D = self.parts.heads, self.parts.kv_heads, self.parts.head_dim
        qkv = qkv_proj(rms_norm(x, norm_in)).view(x.shape[0], H + 2 * K, D)
        if q_norm is not None:  # Qwen3: a norm over each head, before the rotation
            return (rotate(rms_norm(qkv[:, :H], q_norm), cos, sin), rotate(rms_norm(qkv[:, H:H + K], k_norm), cos, sin),
                    qkv[:, H + K:])
        qk = rotate(qkv[:, :H + K], cos, sin)
        return qk[:, :H], qk[:, H:], qkv[:, H + K:]

    def _rest(self, x: torch.Tensor, attn: torch.Tensor, layer: tuple) -> torch.Tensor:
        """The layer's output projection and MLP, each with its residual (x: [N, hidden], attn: [N, H x D])."""
        _, o_proj, gate_up, down, _, norm_post, _, _ = layer
        x = o_proj(attn if attn.dtype == x.dtype else attn.to(x.dtype), x)
        gu = gate_up(rms_norm(x, norm_post))
        half = gu.shape[-1] // 2
        return down(F.silu(gu[:, :half]) * gu[:, half:], x)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The prompts' pass (ids, mask, position: [prompts, P], left-padded): the next-token logits of each prompt
        [prompts, V] and its keys and values per layer ([prompts, K, P, D], for make_kv). A token attends to the
        prompt's real tokens up to itself (and padding to itself: finite values nothing reads). Sets `overflowed`:
        the last layer's activations left float32's range (the weights are broken; the caller stops)."""
        Pn, L = ids.shape
        H, K, D = self.parts.heads, self.parts.kv_heads, self.parts.head_dim
        x = F.embedding(ids.reshape(-1), self.embedding)  # [Pn x L, hidden]
        cos, sin = self._angles(x, position)
        allowed = causal_with_padding(mask)  # [Pn, 1, L, L]
        layers = []
        for layer in self.layers:
            q, k, v = self._qkv(x, layer, cos, sin)
            q, k, v = (t.view(Pn, L, -1, D).transpose(1, 2) for t in (q, k, v))  # [Pn, heads, L, D]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.parts.scaling,
                                                  enable_gqa=H != K)
            x = self._rest(x, attn.transpose(1, 2).reshape(Pn * L, H * D), layer)
            layers.append((k.contiguous(), v.contiguous()))  # not views of the wider q/k/v product
        # weights that blew up: activations whose mean square overflows float32, which RMSNorm turns into zeros
        # (finite, meaningless logits; transformers' forward turns the same into NaN through its masks)
        self.overflowed = bool(torch.isinf(x.float().pow(2).mean(-1)).any() | ~torch.isfinite(x).all())
        return self.head(rms_norm(x.view(Pn, L, -1)[:, -1], self.norm)), layers

    def step(self, tokens: torch.Tensor, position: torch.Tensor, live: torch.Tensor,
             kv: SharedPrefixKV | ExpandedKV) -> torch.Tensor:
        """tokens [b], position [b, 1], live [b] (each row's index among the prompts x n rows) -> logits [b, V]."""
        b = tokens.shape[0]
        x = F.embedding(tokens, self.embedding)  # [b, hidden]
        cos, sin = self._angles(x, position)  # [b, 1, D]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, cos, sin)
            x = self._rest(x, kv.attend(i, q, k, v, live, self.parts.scaling).reshape(b, -1), layer)
        kv.length += 1
        return self.head(rms_norm(x, self.norm))


def forward_hidden(parts: DecoderParts, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                   ) -> torch.Tensor:
    """transformers' forward without its bookkeeping, for the training pass (logprobs.policy_logprobs): the final
    norm's hidden states [B, S, hidden] of ids [B, S] at `position` [B, S], no cache. `mask`: [B, S] (1 on real
    tokens: causal attention over them; padding attends to itself, finite values nothing reads) or a boolean /
    additive [B, 1, S, S] (packed rows). Every module is called as it is (LoRA layers, their dropout, autograd),
    the arithmetic transformers' own: its log-probs and gradients within float32 rounding (tests/unit/
    test_decode.py). ~10% of a small model's training step is transformers' forward's own work (masks, module
    calls, output records): a 4-layer random Qwen2's policy pass and its backward 42.6 -> 38.4 ms."""
    B, S = ids.shape
    H, K, D = parts.heads, parts.kv_heads, parts.head_dim
    x = parts.embed(ids)
    cos, sin = parts.rotary(x, position)  # [B, S, D]
    cos, sin = cos[:, None], (sin * half_sign(D, sin))[:, None]
    if mask.dim() == 2:
        mask = causal_with_padding(mask)

    def norm(t: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        return rms_norm(t, (module.weight, module.variance_epsilon))

    for p in parts.layers:
        h = norm(x, p.norm_in)
        q, k, v = p.q(h).view(B, S, H, D), p.k(h).view(B, S, K, D), p.v(h).view(B, S, K, D)
        if p.q_norm is not None:  # Qwen3
            q, k = norm(q, p.q_norm), norm(k, p.k_norm)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=parts.scaling,
                                              enable_gqa=H != K)
        x = x + p.o(attn.transpose(1, 2).reshape(B, S, H * D))
        h = norm(x, p.norm_post)
        x = x + p.down(F.silu(p.gate(h)) * p.up(h))
    return norm(x, parts.norm)
