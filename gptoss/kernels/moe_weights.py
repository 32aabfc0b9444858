"""MXFP4 expert weights laid out for the MoE kernels (gptoss.kernels.moe_gemm): the checkpoint's rows,
k-blocked, or the "fragments" layout of the Hopper MMA's A operand, with the "bf16x2" re-packing of
each 32-bit word that the kernels' inline-asm upcast reads, and the fp8 kernels' per-block shifts.

    w1 = prepare_mxfp4_weight(gate_up_blocks, gate_up_scales, encoding="bf16x2", fragments=True)
    blocks, scales = w1.checkpoint_layout()   # back to the checkpoint's tensors (the twins use this)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..quant.mxfp4 import fp4_lut, unpack_fp4

FP8_MAX_SHIFT = 14  # e4m3 holds code * 2^(6-d) exactly for d <= 14
ENCODINGS = ("e2m1", "bf16x2")

# "bf16x2" encoding: each 32-bit word (4 bytes, codes k0..k7 of the checkpoint, low nibble first) is
# re-packed so that a few rotate/mask steps give bf16x2 words: a code's sign lands on bit 15 (31) and its
# three magnitude bits on bits 8..6 (24..22), i.e. the bf16 (sign, exponent low bits, mantissa top
# bit) of code * 2^-126. Per code: (sign bit, magnitude bits high to low) in the stored word.
#   word & M -> (k0, k1);  rotl(word, 28) & M -> (k4, k5);  (word << 6) & M -> (k2, k3);
#   (rotl(word, 2) & 0x00400040) | (rotl(word, 10) & 0x81808180) -> (k6, k7)
# with M = 0x81C081C0: 9 SASS operations a word (a rotate is one funnel shift). Three outputs can be
# one rotate and one mask each, the fourth then needs two pieces: no placement of the 32 bits makes
# all four single pieces (searched), and this one's pieces cost 4 operations where the earlier
# placement's three-piece (k6, k7) cost 6. Then one mul.bf16x2 by 2^(s-1) (2^126 and the block scale
# 2^(s-127) in one, where every scale s <= 128) or two. Each output pairs the two codes of one stored
# byte: one row's two neighbouring k, which is how the MMA's A fragment pairs them (no register
# shuffles).
_BF16X2_BITS = ((15, (8, 7, 6)), (31, (24, 23, 22)), (9, (2, 1, 0)), (25, (18, 17, 16)),
                (19, (12, 11, 10)), (3, (28, 27, 26)), (5, (30, 29, 4)), (21, (14, 13, 20)))
ONE_MUL_MAX_SCALE = 128  # 2^(s-1) is a bf16 (<= 2^127) up to here


def encode_bf16x2(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] checkpoint bytes -> uint8 [..., K/2] in the "bf16x2" encoding (K/2 % 4 == 0)."""
    b = data.reshape(*data.shape[:-1], -1, 4).to(torch.int32)
    codes = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)  # [..., K/8, 8]: k0..k7
    w = torch.zeros(codes.shape[:-1], dtype=torch.int32, device=data.device)
    for k, (sign, mag) in enumerate(_BF16X2_BITS):
        c = codes[..., k]
        w |= ((c >> 3) & 1) << sign
        for i, bit in enumerate(mag):
            w |= ((c >> (2 - i)) & 1) << bit
    out = torch.stack([(w >> (8 * i)) & 255 for i in range(4)], dim=-1)
    return out.to(torch.uint8).reshape(data.shape)


def decode_bf16x2(data: torch.Tensor) -> torch.Tensor:
    """The inverse of encode_bf16x2."""
    b = data.reshape(*data.shape[:-1], -1, 4).to(torch.int32)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    codes = []
    for sign, mag in _BF16X2_BITS:
        c = ((w >> sign) & 1) << 3
        for i, bit in enumerate(mag):
            c |= ((w >> bit) & 1) << (2 - i)
        codes.append(c)
    c = torch.stack(codes, dim=-1)  # [..., K/8, 8]
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8).reshape(data.shape)


# "fragments" layout (Hopper): the weights are the MMA's A operand, upcast in registers, and each
# thread's bytes of four 16-deep MMA steps lie in one 16-byte run (one vector load, no shared-memory
# round trip). An A fragment of 16 rows x 16 codes gives lane 4g + t rows g and g + 8, codes 2t, 2t + 1
# and 2t + 8, 2t + 9 (bytes t and t + 4). Weight byte (n, j) with
#     n = 16G + 8h + 2p + s,   j = 32C + 8q + 4w + t     (h, s, w in 0..1; p, q, t in 0..3)
# is stored at row 4G + p, column 128C + 64s + 16t + 4q + 2w + h: the lane of row g = 2p + s reads
# columns 128C + 64s + 16t .. +16, and the lanes of rows 2p and 2p + 1 fill one 128-byte line. Each
# 4-byte word is then one k16 step of one lane (rows g, g+8 x bytes t, t+4), "bf16x2"-encoded. The
# scale of (n, block 2C + q // 2) is stored at row 4G + p, column 8C + 4s + 2(q // 2) + h.
_FRAG_DATA = (0, 1, 3, 5, 4, 8, 6, 7, 2)  # [E, G, h, p, s, C, q, w, t] -> [E, G, p, C, s, t, q, w, h]
_FRAG_SCALES = (0, 1, 3, 5, 4, 6, 2)      # [E, G, h, p, s, C, qh] -> [E, G, p, C, s, qh, h]


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=perm.__getitem__))


def swizzle_fragments(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-layout bytes [E, N, K/2] and scales [E, N, K/32] -> the "fragments" layout: bytes
    [E, N/4, 2Kp], scales [E, N/4, Kp/8], K padded to Kp (a multiple of 64) with zero codes."""
    E, N, KH = data.shape
    if N % 16:
        raise ValueError(f"the fragments layout needs a multiple of 16 weight rows, got {N}")
    kp = -(-2 * KH // 64) * 64
    data = torch.nn.functional.pad(data, (0, kp // 2 - KH))
    scales = torch.nn.functional.pad(scales, (0, kp // 32 - scales.shape[-1]))
    d = data.reshape(E, N // 16, 2, 4, 2, kp // 64, 4, 2, 4).permute(_FRAG_DATA).reshape(E, N // 4, 2 * kp)
    s = scales.reshape(E, N // 16, 2, 4, 2, kp // 64, 2).permute(_FRAG_SCALES).reshape(E, N // 4, kp // 8)
    return d.contiguous(), s.contiguous()


def unswizzle_fragments(data: torch.Tensor, scales: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of swizzle_fragments: bytes [E, N, K/2], scales [E, N, K/32] (padding dropped)."""
    E, R, B = data.shape
    kp = B // 2
    d = data.reshape(E, R // 4, 4, kp // 64, 2, 4, 4, 2, 2).permute(_inverse(_FRAG_DATA))
    s = scales.reshape(E, R // 4, 4, kp // 64, 2, 2, 2).permute(_inverse(_FRAG_SCALES))
    return (d.reshape(E, 4 * R, kp // 2)[..., : k // 2].contiguous(),
            s.reshape(E, 4 * R, kp // 32)[..., : k // 32].contiguous())


@dataclass
class MXFP4Weight:
    """One projection (gate_up or down) of the local experts, laid out for the kernels."""
    data: torch.Tensor            # uint8: [E, N, K/2] (block_k 0) or [E, Kp/BK, N, BK/2]
    scales: torch.Tensor          # uint8 e8m0: [E, N, K/32] or [E, Kp/BK, N, BK/32]
    n: int
    k: int
    block_k: int = 0              # 0: row layout; else the k-blocked layout's BK
    encoding: str = "e2m1"        # "e2m1": checkpoint bytes; "bf16x2": re-packed for the asm upcast
    fragments: bool = False       # the "fragments" layout (swizzle_fragments), "bf16x2" and swap_ab only
    fp8_shift: torch.Tensor | None = None      # uint8, like scales: s_max(row) - s, for "fp8"
    fp8_row_scale: torch.Tensor | None = None  # float32 [E, N]: 2^(s_max - 133), for "fp8"
    small_scales: bool = False    # every scale <= ONE_MUL_MAX_SCALE: the "bf16x2" upcast multiplies once

    @property
    def upcast_mode(self) -> int:
        """The kernels' DEQ_ASM: 0 (not "bf16x2"), 1 (two multiplies a pair), 2 (one)."""
        return 0 if self.encoding != "bf16x2" else 2 if self.small_scales else 1

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    def strides(self, block_k: int) -> tuple[int, int, int, int, int, int]:
        """(expert, row, k-block) strides of data and of scales for kernel tiles of block_k."""
        d, s = self.data, self.scales
        if self.fragments:  # a K step of block_k codes: 2 * block_k bytes and block_k / 8 scales a row
            return d.stride(0), d.stride(1), 2 * block_k, s.stride(0), s.stride(1), block_k // 8
        if self.block_k:
            return d.stride(0), d.stride(2), d.stride(1), s.stride(0), s.stride(2), s.stride(1)
        return d.stride(0), d.stride(1), block_k // 2, s.stride(0), s.stride(1), block_k // 32

    def checkpoint_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks [E, N, K/32, 16], scales [E, N, K/32]) as in the checkpoint."""
        d, s = self.data, self.scales
        if self.block_k:
            d = d.permute(0, 2, 1, 3).flatten(2)[:, :, : self.k // 2]
            s = s.permute(0, 2, 1, 3).flatten(2)[:, :, : self.k // 32]
        if self.encoding == "bf16x2":
            d = decode_bf16x2(d)
        if self.fragments:
            d, s = unswizzle_fragments(d, s, self.k)
        return d.reshape(d.shape[0], self.n, self.k // 32, 16), s


def prepare_mxfp4_weight(blocks: torch.Tensor, scales: torch.Tensor, block_k: int = 0,
                         fp8: bool = False, encoding: str = "e2m1", fragments: bool = False) -> MXFP4Weight:
    """blocks [E, N, K/32, 16], scales [E, N, K/32] (checkpoint layout) -> MXFP4Weight.

    block_k 0 keeps the row layout (a view, no copy, unless re-encoded); a power of two >= 32
    re-lays the weight k-blocked. fp8 adds the per-block shifts and per-row scales the "fp8"
    activations need. encoding "bf16x2" re-packs the codes for the "bf16" kernels' asm upcast.
    fragments (with "bf16x2" only): the layout of swizzle_fragments, for swap_ab kernels."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}; choose one of {ENCODINGS}")
    E, N, KB, _ = blocks.shape
    K = KB * 32
    data = blocks.reshape(E, N, K // 2)
    sc = scales
    if fragments:  # swizzled first: the encoding re-packs each stored 4-byte word
        if encoding != "bf16x2" or block_k or fp8:
            raise ValueError("the fragments layout takes encoding='bf16x2', block_k=0 and fp8=False")
        data, sc = swizzle_fragments(data, scales)
    small = False
    if encoding == "bf16x2":  # one expert at a time: the int32 temporaries are 16x the bytes
        data = torch.stack([encode_bf16x2(data[e]) for e in range(E)]) if E else data.clone()
        small = not scales.numel() or int(scales.max()) <= ONE_MUL_MAX_SCALE  # one host sync, at load
    if fragments:
        return MXFP4Weight(data, sc, N, K, 0, encoding, fragments=True, small_scales=small)
    if block_k:
        if block_k < 32 or block_k & (block_k - 1):
            raise ValueError(f"block_k={block_k} must be a power of two >= 32")
        kp = triton.cdiv(K, block_k) * block_k
        data = torch.nn.functional.pad(data, (0, (kp - K) // 2))
        data = data.reshape(E, N, kp // block_k, block_k // 2).permute(0, 2, 1, 3).contiguous()
        sc = torch.nn.functional.pad(sc, (0, (kp - K) // 32))
        sc = sc.reshape(E, N, kp // block_k, block_k // 32).permute(0, 2, 1, 3).contiguous()
    w = MXFP4Weight(data, sc, N, K, block_k, encoding, small_scales=small)
    if fp8:
        s = scales.to(torch.int32)
        smax = s.amax(-1, keepdim=True)
        shift = (smax - s).clamp(max=255).to(torch.uint8)
        if block_k:
            shift = torch.nn.functional.pad(shift, (0, (sc.shape[1] * block_k - K) // 32), value=255)
            shift = shift.reshape(E, N, -1, block_k // 32).permute(0, 2, 1, 3).contiguous()
        w.fp8_shift = shift
        w.fp8_row_scale = torch.ldexp(torch.ones_like(smax[..., 0], dtype=torch.float32), smax[..., 0] - 133)
    return w


def _fp8_weight_torch(w: MXFP4Weight) -> torch.Tensor:
    """float32 [E, N, K]: the e4m3 weight the "fp8" kernels build in registers, times its row scale."""
    blocks, scales = w.checkpoint_layout()
    codes = fp4_lut(blocks.device)[unpack_fp4(blocks).long()]  # [E, N, K/32, 32]
    s = scales.to(torch.int32)
    d = s.amax(-1, keepdim=True) - s
    mult = torch.where(d > FP8_MAX_SHIFT, torch.zeros_like(d, dtype=torch.float32),
                       torch.ldexp(torch.ones_like(d, dtype=torch.float32), 6 - d.clamp(max=FP8_MAX_SHIFT)))
    q = (codes * mult.unsqueeze(-1)).flatten(-2)
    return q * w.fp8_row_scale.unsqueeze(-1)
