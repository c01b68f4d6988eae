import os

import torch

# Triton kernels run on the CPU through Triton's interpreter; the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.layers import rms_norm, rotary_, silu_and_mul
from kernels.meta import LoRAMeta
from kernels.ops import BACKENDS, add_lora, add_lora_slices, linear, linear_lora
from kernels.paged_attention import paged_decode_attention

__all__ = ["BACKENDS", "LoRAMeta", "add_lora", "add_lora_slices", "linear", "linear_lora", "paged_decode_attention", "rms_norm",
           "rotary_", "silu_and_mul"]
