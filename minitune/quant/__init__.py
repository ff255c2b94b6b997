"""4-bit quantization for QLoRA: NF4 with double quantization, a Triton
dequant kernel and a 4-bit linear layer.  Triton is imported lazily."""
from .linear4bit import Linear4bit, dequantize_auto, dequantize_model, quantize_model
from .nf4 import (NF4_CODE, NF4Tensor, bits_per_param, dequantize_nf4, dynamic_map_8bit,
                  nbytes, quantize_nf4)
from .nf4_triton import dequantize_nf4_triton, triton_available

__all__ = [
    "NF4_CODE", "NF4Tensor", "quantize_nf4", "dequantize_nf4", "nbytes", "bits_per_param",
    "dynamic_map_8bit", "dequantize_nf4_triton", "triton_available", "Linear4bit",
    "quantize_model", "dequantize_model", "dequantize_auto",
]
