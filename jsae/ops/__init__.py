"""Numerics with custom VJPs that the SAE families build on.

  straight_through   JumpReLU and Heaviside step with the paper's pseudo-derivatives
  matmul             mixed-precision matmul (bf16 operands, float32 accumulation and
                     weight gradients), decoder-row norms
  sparse             gathers and scatter-adds over each row's few non-zero latents,
                     for the sparse train step (`sae.sparse_capacity`)
"""

from jsae.ops.matmul import decoder_norms, matmul
from jsae.ops.straight_through import jumprelu, rectangle, step

__all__ = ["decoder_norms", "jumprelu", "matmul", "rectangle", "step"]
