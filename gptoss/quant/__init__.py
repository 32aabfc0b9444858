"""Quantized formats: MXFP4 weights (the checkpoint's), MXFP8 and FP8 activations."""

from .fp8 import dequantize_fp8, quantize_fp8
from .mxfp4 import dequantize_mxfp4, pack_fp4, quantize_mxfp4, unpack_fp4
from .mxfp8 import dequantize_mxfp8, quantize_mxfp8

__all__ = [
    "dequantize_fp8", "quantize_fp8",
    "dequantize_mxfp4", "quantize_mxfp4", "pack_fp4", "unpack_fp4",
    "dequantize_mxfp8", "quantize_mxfp8",
]
