"""An MLP transcoder of Gemma 3 270M (Gemma Scope 2's kind): the encoder reads the MLP's
input at layer 6 (`mlp_in.6`, the pre-MLP norm's output), the decoder predicts the MLP's
output (`mlp_out.6`, after the post-MLP norm); with skip=1 an affine skip x @ W_skip is
trained beside the latents. The demo's text, harvest and training budget.

  jsae demo --config=transcoder --workdir=runs/transcoder           # JumpReLU transcoder
  jsae demo --config=transcoder:skip=1 --workdir=runs/skip_transcoder
  jsae demo --config=transcoder:family=topk,layer=9 --workdir=runs/tc_topk_9

`jsae harvest` with this config writes both sites from the same forward passes
(row-aligned shard sets); `jsae eval` measures FVU of the MLP's output and the
delta LM loss with the transcoder in place of the MLP (the MLP is not run).
"""

from configs import default, demo


def get_config(arg: str | None = None):
  """demo.py as a transcoder of `layer`'s MLP (args: family=NAME, skip=0|1, layer=L)."""
  args = default.parse_arg(arg)
  unknown = sorted(set(args) - {"family", "skip", "layer"})
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}; configs/transcoder.py takes"
                     " family=NAME, skip=0|1 and layer=L.")
  c = demo.get_config(f"family={args['family']}" if "family" in args else None)
  layer = int(args.get("layer", 6))
  c.lm.site = f"mlp_in.{layer}"
  c.sae.target_site = f"mlp_out.{layer}"
  c.sae.d_out = 0  # the MLP's output has the residual width, as its input
  c.sae.skip = args.get("skip", "0") not in ("0", "", "false", "False")
  c.sae.pre_encoder_bias = False  # b_dec lives in the output's space
  return c
