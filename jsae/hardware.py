"""The machines dry runs estimate on, and the FLOPs of the LM stages.

Each `Hardware` is sold as a slice or a card; its figures are the vendor's (dense
bfloat16 peak, memory per JAX device) and its MFU says where it comes from: measured
by this project's benchmarks, or reported by Gemma Scope (Lieberum et al., 2024).
"""

from __future__ import annotations

import dataclasses
import math

from jsae.lm import gemma

# The H100 MFU of bench/sharded_step.py (JumpReLU, 3584 x 131072, batch 4096):
# README "Benchmarks". Other families and widths are assumed to reach the same.
H100_MFU = {"bfloat16": 0.464, "float32": 0.246}
GEMMA_SCOPE_TPU_MFU = 0.508  # Gemma Scope section 3.3: 131K width, 8 TPUv3 chips
LM_MFU = 0.4  # assumed for the harvest's LM forward (bench/lm_forward.py measures it)


@dataclasses.dataclass(frozen=True)
class Hardware:
  """A machine the dry run estimates wall time on.

  Attributes:
    name: how it is sold (TPU v3 and v5p slices by TensorCore count, v5e by chip).
    devices: JAX devices it offers (v3: one per core; v5e, v5p: one per chip).
    peak_tflops: dense bfloat16 peak per device.
    memory_gib: accelerator memory per device.
    mfu: {compute dtype: MFU of an SAE train step}.
    mfu_source: where `mfu` comes from.
  """

  name: str
  devices: int
  peak_tflops: float
  memory_gib: float
  mfu: dict
  mfu_source: str


HARDWARE = (
    Hardware("TPU v3-8", devices=8, peak_tflops=61.5, memory_gib=16.0,
             mfu={"float32": GEMMA_SCOPE_TPU_MFU, "bfloat16": GEMMA_SCOPE_TPU_MFU},
             mfu_source="Gemma Scope's reported 50.8% (8 TPUv3 chips); not measured here"),
    Hardware("TPU v5e-8", devices=8, peak_tflops=197.0, memory_gib=16.0,
             mfu={"float32": GEMMA_SCOPE_TPU_MFU, "bfloat16": GEMMA_SCOPE_TPU_MFU},
             mfu_source="assumed equal to Gemma Scope's TPUv3 figure; not measured"),
    Hardware("TPU v5p-8", devices=4, peak_tflops=459.0, memory_gib=95.0,
             mfu={"float32": GEMMA_SCOPE_TPU_MFU, "bfloat16": GEMMA_SCOPE_TPU_MFU},
             mfu_source="assumed equal to Gemma Scope's TPUv3 figure; not measured"),
    Hardware("1x H100", devices=1, peak_tflops=989.0, memory_gib=79.6, mfu=dict(H100_MFU),
             mfu_source="measured by bench/sharded_step.py on one H100 (bf16 46.4%,"
                        " float32/TF32 24.6%)"),
)


def lm_flops_per_token(lm_config: gemma.GemmaConfig, site: str, seq_len: int) -> float:
  """Forward FLOPs per token up to and including the hooked layer (no unembedding).

  2 x the layers' weights, plus attention scores and values over the causal
  context (mean length (seq_len + 1) / 2, capped by a local layer's window).
  """
  _, layer = gemma.parse_site(site, lm_config)
  shapes = gemma.param_shapes(lm_config)["layers"]
  total = 0.0
  for i in range(layer + 1):
    weights = sum(math.prod(s) for s in shapes[i].values() if len(s) > 1)
    context = (seq_len + 1) / 2
    if not lm_config.is_global(i):
      context = min(context, lm_config.sliding_window)
    total += 2 * weights + 4 * context * lm_config.n_heads * lm_config.head_dim
  return total


def unembed_flops_per_token(lm_config: gemma.GemmaConfig) -> float:
  """FLOPs of one position's logits: the tied [d_model, vocab] unembedding."""
  return 2.0 * lm_config.d_model * lm_config.vocab_size


def suffix_flops_per_token(lm_config: gemma.GemmaConfig, site: str, seq_len: int) -> float:
  """Forward FLOPs per token from the hooked layer to the logits (a spliced suffix)."""
  last = gemma.site_name("resid_post", lm_config.n_layers - 1)
  _, layer = gemma.parse_site(site, lm_config)
  before = (lm_flops_per_token(lm_config, gemma.site_name("resid_post", layer - 1), seq_len)
            if layer else 0.0)
  return (lm_flops_per_token(lm_config, last, seq_len) - before
          + unembed_flops_per_token(lm_config))
