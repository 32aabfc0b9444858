"""Plain-torch twins of the paged-attention kernels (the reference, and the CPU path).

Cache layout per layer: k_cache / v_cache [num_blocks, block_size, num_kv_heads, head_dim] in the
model dtype or torch.float8_e4m3fn. An fp8 cache carries float32 scales k_scale / v_scale
[num_blocks, block_size, num_kv_heads]: one per token and head, amax / 448, set when the token is
written (docs/kv_cache.md), so that value = code * scale.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MIN_NORMAL_F32 = 2.0 ** -126


def fp8_scale_torch(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> float32 [...]: amax(|x|) / 448, so the row's largest element becomes +-448 exactly.

    A zero row gets 2^-126 (codes 0). Division is IEEE round-to-nearest here and in the Triton
    kernel (tl.math.div_rn), which makes the two bit-exact.
    """
    amax = x.float().abs().amax(dim=-1)
    # a tensor divisor: CUDA torch turns division by a Python scalar into a multiply by its reciprocal
    return (amax / torch.full_like(amax, FP8_MAX)).clamp_min(_MIN_NORMAL_F32)


def quantize_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes float8_e4m3fn [..., D], scales float32 [...]); x ~= codes * scales."""
    s = fp8_scale_torch(x)
    codes = (x.float() / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, s


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """k, v [T, Hkv, D] into the cache slots named by slot_mapping [T] (negative slots are skipped).

    With k_scale / v_scale [num_blocks, block_size, Hkv] (fp8 caches) each token-head row is
    quantized with its own scale amax / 448; without them values are cast to the cache dtype.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kc = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
    vc = v_cache.view(-1, *v_cache.shape[2:])
    for x, cache, scale in ((k[keep], kc, k_scale), (v[keep], vc, v_scale)):
        if scale is None:
            x = x.to(cache.dtype)
        else:
            x, s = quantize_fp8_torch(x)
            scale.view(-1, scale.shape[-1]).index_copy_(0, slots, s)
        if cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernels: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.index_copy_(0, slots, x)


def apply_rope_torch(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated at positions [T] by the fp32 tables cos / sin [max_pos, D/2]: the two
    halves are the pairs; computed in fp32 and rounded once to x.dtype, as the fused kernel does."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_write_kv_torch(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale=None,
                        v_scale=None) -> torch.Tensor:
    """The twin of attention.rope_write_kv: rotated q returned, rotated k and v written to the cache."""
    write_kv_torch(apply_rope_torch(k, positions, cos, sin), v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return apply_rope_torch(q, positions, cos, sin)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int],
                          sinks: torch.Tensor, sm_scale: float, window: int | None,
                          k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] (the new tokens of each sequence, packed) -> [T, Hq, D].

    A sequence's new tokens are the last query_len of its seq_len positions. Keys are causal and, on
    sliding layers, limited to the last `window` positions (the query's own included). Each head's
    sink logit joins the softmax denominator and carries no value. fp8 caches are dequantized with
    k_scale / v_scale [num_blocks, block_size, Hkv] (code * scale).
    """
    T, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    sink = sinks.float().view(Hkv, group, 1, 1)
    start = 0
    for b, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        ql, sl = int(ql), int(sl)
        if ql == 0:
            continue
        # only the blocks some query can see: a sliding layer's window starts late
        first = max(0, sl - ql - window + 1) if window is not None and window > 0 else 0
        b0, nblk = first // block_size, -(-sl // block_size)
        blocks = block_tables[b, b0:nblk].long()
        k0 = b0 * block_size
        k = k_cache[blocks].flatten(0, 1)[:sl - k0].float()  # [L, Hkv, D], positions k0..sl-1
        v = v_cache[blocks].flatten(0, 1)[:sl - k0].float()
        if k_scale is not None:
            k = k * k_scale[blocks].flatten(0, 1)[:sl - k0, :, None].float()
        if v_scale is not None:
            v = v * v_scale[blocks].flatten(0, 1)[:sl - k0, :, None].float()
        qs = q[start:start + ql].float().view(ql, Hkv, group, D)  # GQA: query groups share a kv head
        scores = torch.einsum("qhgd,khd->hgqk", qs, k) * sm_scale  # [Hkv, group, ql, L]
        qpos = torch.arange(sl - ql, sl, device=q.device)[:, None]
        kpos = torch.arange(k0, sl, device=q.device)[None, :]
        allowed = kpos <= qpos
        if window is not None and window > 0:
            allowed &= qpos - kpos < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        logits = torch.cat([scores, sink.expand(Hkv, group, ql, 1)], dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink takes its share, then is dropped
        o = torch.einsum("hgqk,khd->qhgd", probs, v)  # [ql, Hkv, group, D]
        out[start:start + ql] = o.reshape(ql, Hq, D).to(q.dtype)
        start += ql
    return out
