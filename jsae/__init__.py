"""jsae: JumpReLU (and ReLU, TopK, BatchTopK, Matryoshka, Gated) sparse autoencoders in JAX.

    import jsae
    f = jsae.jumprelu(z, threshold, bandwidth)         # straight-through JumpReLU
    params = jsae.saes.get("jumprelu").init(key, d_in=2304, d_sae=16384)
    f = jsae.encode(params, x); x_hat = jsae.decode(params, f)
"""

from jsae import formats, runs, saes
from jsae.ops import jumprelu, step
from jsae.sae import SAE, stack, unstack
from jsae.formats import load, save

__version__ = "0.1.0"


def encode(params, x, **kw):
  """Latents `[..., d_sae]` of `x: [..., d_in]` for any family's params (jit/vmap-able).

  The training form: reverse-mode gradients are the straight-through estimators.
  For ordinary derivatives in either mode (jvp, jacfwd) use `jsae.SAE`.
  """
  return saes.family_of(params).encode(params, x, **kw)


def decode(params, f, **kw):
  """Reconstruction `[..., d_in]` of latents `f: [..., d_sae]` for any family's params.

  Reverse mode only (its matmul has a custom VJP); `jsae.SAE.decode` supports both.
  """
  return saes.family_of(params).decode(params, f, **kw)


__all__ = ["jumprelu", "step", "encode", "decode", "formats", "runs", "saes", "SAE", "load",
           "save", "stack", "unstack", "__version__"]
