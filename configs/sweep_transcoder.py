"""docs/results.md's transcoder comparison on Gemma 3 270M layer 6: JumpReLU transcoders
(mlp_in.6 -> mlp_out.6), skip transcoders, and SAEs of mlp_out.6, three L0s each.

  jsae harvest --config=configs/transcoder.py --workdir=runs/tc_acts   # mlp_in.6 + mlp_out.6
  jsae sweep --config=configs/sweep_transcoder.py:kind=transcoder --workdir=runs/sweep_tc
  jsae sweep --config=configs/sweep_transcoder.py:kind=skip --workdir=runs/sweep_skip
  jsae sweep --config=configs/sweep_transcoder.py:kind=sae --workdir=runs/sweep_sae_mlp_out
  jsae sweep --config=configs/sweep_transcoder.py:kind=sae,lambdas=1e-2+3e-3+1e-3 \
      --workdir=runs/sweep_sae_mlp_out_sparse                # SAEs at the transcoders' L0s
  jsae eval --config=configs/transcoder.py --workdir=runs/tc_acts --sae=runs/sweep_tc
  jsae eval --config=configs/transcoder.py:skip=1 --workdir=runs/tc_acts --sae=runs/sweep_skip
  jsae eval --config=configs/demo.py --workdir=runs/tc_acts --sae=runs/sweep_sae_mlp_out \\
      --config.lm.site=mlp_out.6

Each sweep is one group of three members (lambda from sparse to dense, `lambdas=A+B+C`
to choose others) with the demo's
budget (600 steps of 1024 tokens) on the harvested shards (`acts=DIR`, default
runs/tc_acts). A skip transcoder's `skip` is a shape setting, so each kind is a sweep
of its own.
"""

from configs import default, demo, transcoder
from jsae import sweep

LAMBDAS = (3e-4, 6e-5, 1.2e-5)  # from sparse to dense (inputs and outputs at E||.||^2 = 1)


def get_config(arg: str | None = None):
  """One group of JumpReLU `kind` (transcoder, skip or sae) at three lambdas."""
  args = default.parse_arg(arg)
  unknown = sorted(set(args) - {"kind", "acts", "lambdas"})
  kind = args.get("kind", "transcoder")
  if unknown or kind not in ("transcoder", "skip", "sae"):
    raise ValueError("configs/sweep_transcoder.py takes kind=transcoder|skip|sae, acts=DIR"
                     " and lambdas=A+B+C.")
  lambdas = tuple(float(v) for v in args["lambdas"].split("+")) if "lambdas" in args else LAMBDAS
  acts = args.get("acts", "runs/tc_acts")
  if kind == "sae":
    c = demo.get_config()
    c.lm.site = "mlp_out.6"
  else:
    c = transcoder.get_config("skip=1" if kind == "skip" else None)
  c.data.shards_dir = f"{acts}/activations/train/{c.lm.site}"
  c.data.eval_shards_dir = f"{acts}/activations/eval/{c.lm.site}"
  groups = {kind: sweep.group(c, {"sparsity_coeff": lambdas})}
  return sweep.sweep_config(c, groups)
