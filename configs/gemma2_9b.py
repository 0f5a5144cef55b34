"""The Jumping Ahead / Gemma Scope comparison on Gemma 2 9B: one site, one layer, one width.

  # what it costs, before any data exists (no weights, no data read):
  jsae sweep --config=configs/gemma2_9b.py:site=resid_post,layer=20 --workdir=x --dry_run
  # the harvest's LM mesh, memory and time on each machine, before any weight is read:
  jsae harvest --config=configs/gemma2_9b.py:site=resid_post,layer=20,family=jumprelu --dry_run
  # harvest the activations, then the whole comparison (3 families x 6 sparsities):
  jsae harvest --config=configs/gemma2_9b.py:site=resid_post,layer=20,family=jumprelu,hardware=v3-8 \
      --workdir=acts/gemma2_9b --config.lm.checkpoint=PATH_TO_GEMMA_2_9B
  jsae sweep --config=configs/gemma2_9b.py:site=resid_post,layer=20 --workdir=runs/9b_res_l20
  # one point as a single run:
  jsae train --config=configs/gemma2_9b.py:site=mlp_out,layer=9,family=topk,point=2 --workdir=...

Arguments (comma-separated KEY=VALUE):
  site      resid_post (default), mlp_out, attn_z (attention output before W_O, 16 x 256)
  layer     9, 20 (default) or 31: the paper's layers (any of 0..41 is accepted)
  width     latents: 16384 .. 1048576, a power of two (default 131072, the paper's)
  families  the sweep's groups, '+'-separated (default jumprelu+gated+topk, the paper's
            comparison; also relu, batchtopk, matryoshka)
  family    a single run of one family instead of a sweep (for jsae train / harvest)
  point     with family=: the index into that family's sparsity grid (default: the middle)
  tokens    override the training budget (e.g. tokens=50000000 for a pilot)
  targets   1: JumpReLU, Gated and ReLU sweep a target L0 (TARGET_L0S, the TopK kinds'
            k) reached by the lambda controller (loss.l0_control), instead of lambda
  hardware  v3-8, v5e-8, v5p-8 or h100: the LM mesh (harvest, eval, browse) for that
            machine, per process (LM_MESHES); default auto, which resolves to the same
            on those machines (`jsae harvest --dry_run` shows it)

Settings from Gemma Scope (GS, section 3) and Jumping Ahead (JR): batch 4096; Adam
(0, 0.999), lr 7e-5, 1000-step warm-up; bandwidth and initial threshold 0.001; lambda
warm-up 10,000 steps; float32; 4B tokens at width 2^14, 8B at 2^15..2^19, 16B at 2^20;
meshes: data parallel at 2^14, latent (Megatron) parallel above (GS section 3.3).
The JumpReLU grid brackets GS's released lambdas (4e-3 -> L0 ~10, 1e-3 -> ~32, 6e-4 ->
~50 on 9B residual layers); the other families' grids are starting points chosen to
span L0 ~10-300, not values from the papers: check the ends with a pilot (tokens=5e7).
"""

from configs import default
from jsae import sweep

D_MODEL, N_LAYERS, ATTN_WIDTH = 3584, 42, 16 * 256
SITES = {"resid_post": D_MODEL, "mlp_out": D_MODEL, "attn_z": ATTN_WIDTH}

# Each family's sparsity knob, from sparse (L0 ~10) to dense (L0 ~200+).
GRIDS = {
    "jumprelu": {"sparsity_coeff": (4e-3, 2e-3, 1e-3, 6e-4, 3e-4, 1.5e-4)},
    "gated": {"sparsity_coeff": (3e-2, 1.5e-2, 8e-3, 4e-3, 2e-3, 1e-3)},
    "relu": {"sparsity_coeff": (3e-2, 1.5e-2, 8e-3, 4e-3, 2e-3, 1e-3)},
    "topk": {"k": (10, 20, 40, 80, 160, 320)},
    "batchtopk": {"k": (10, 20, 40, 80, 160, 320)},
    "matryoshka": {"k": (10, 20, 40, 80, 160, 320)},
}
COMPARISON = ("jumprelu", "gated", "topk")
ARGS = ("site", "layer", "width", "families", "family", "point", "tokens", "hardware",
        "targets")
# targets=1: the L0s the lambda families are steered to, matching the TopK kinds' k.
TARGET_L0S = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
CONTROLLED = ("jumprelu", "gated", "relu")
# The LM's (data, model) mesh per machine: 9B's bfloat16 weights are 17.2 GiB, more than
# a 16-GiB TPU v3 / v5e core holds, so those split them 4 ways (4.3 GiB a core, room
# for the activations) and run two such groups side by side; v5p (95 GiB) and the H100
# hold them whole.
LM_MESHES = {"v3-8": (2, 4), "v5e-8": (2, 4), "v5p-8": (4, 1), "h100": (1, 1)}


def tokens_for(width: int) -> int:
  """GS Table 1's training budget for a width."""
  return 4_000_000_000 if width <= 2**14 else 16_000_000_000 if width >= 2**20 else 8_000_000_000


def grids(targets: bool) -> dict:
  """Each family's swept field and values: lambda grids, or with `targets` target L0s
  for the lambda families."""
  return {f: ({"target_l0": TARGET_L0S} if targets and f in CONTROLLED else g)
          for f, g in GRIDS.items()}


def family_config(family: str, site: str, layer: int, width: int, targets: bool = False):
  """The single-run config of `family` at (site, layer, width), at the grid's middle."""
  c = default.get_config(f"family={family}")
  c.lm.model = "gemma2_9b"
  c.lm.site = f"{site}.{layer}"
  c.lm.dtype = "bfloat16"  # the harvest's forward (stored activations stay float32)
  c.text.seq_len = 1024
  c.text.max_train_tokens = 0  # harvest what the run consumes (train.num_tokens)
  c.text.max_eval_tokens = 2048 * 1024  # GS's evaluation set: 2,048 sequences of 1,024
  c.eval.lm_contexts = 2048
  c.harvest.batch_size = 8
  c.data.source = "shards"
  # Where `jsae harvest --workdir=acts/gemma2_9b` writes them.
  c.data.shards_dir = f"acts/gemma2_9b/activations/train/{site}.{layer}"
  c.data.eval_shards_dir = f"acts/gemma2_9b/activations/eval/{site}.{layer}"
  c.data.batch_size = 4096
  c.sae.d_in = SITES[site]
  c.sae.d_sae = width
  c.train.num_tokens = tokens_for(width)
  c.train.log_every = 1000
  c.ckpt.every_steps = 20_000
  c.eval.every_steps = 50_000
  if family == "jumprelu":
    c.sae.bandwidth = 0.001
    c.sae.init_threshold = 0.001
    c.sae.threshold_param = "log"  # the GDM reference parametrisation
    c.loss.sparsity_warmup_steps = 10_000
  elif "sparsity_warmup_steps" in c.loss:
    c.loss.sparsity_warmup_steps = 10_000
  if "k_aux" in c.sae:
    c.sae.k_aux = 512  # Gao et al.'s default (JR's baseline setting is unpublished)
  for field, values in GRIDS[family].items():
    (c.sae if field in c.sae else c.loss)[field] = values[len(values) // 2]
  if targets and family in CONTROLLED:  # lambda starts at its grid's middle, then steered
    c.loss.l0_control = True
    c.loss.target_l0 = TARGET_L0S[len(TARGET_L0S) // 2]
  # GS section 3.3: data parallel for 2^14, latent-parallel (Megatron) above.
  c.mesh.data, c.mesh.model = (-1, 1) if width <= 2**14 else (1, -1)
  return c


def get_config(arg: str | None = None):
  """A sweep over `families` (default) or, with family=NAME, one single-run config."""
  args = default.parse_arg(arg)
  unknown = sorted(set(args) - set(ARGS))
  if unknown:
    raise ValueError(f"unknown argument(s) {unknown}; configs/gemma2_9b.py takes {ARGS}.")
  site = args.get("site", "resid_post")
  if site not in SITES:
    raise ValueError(f"site={site}: one of {sorted(SITES)} (attn_z is the attention output"
                     " before W_O, Gemma Scope's 'att' SAEs).")
  layer = int(args.get("layer", 20))
  if not 0 <= layer < N_LAYERS:
    raise ValueError(f"layer={layer}: Gemma 2 9B has layers 0..{N_LAYERS - 1} (the paper's:"
                     " 9, 20, 31).")
  width = int(args.get("width", 2**17))
  if width < 2**14 or width > 2**20 or width & (width - 1):
    raise ValueError(f"width={width}: a power of two from 16384 to 1048576 (Gemma Scope's).")
  targets = args.get("targets", "0") not in ("0", "")
  if "family" in args:
    family = args["family"]
    if family not in GRIDS:
      raise ValueError(f"family={family}: one of {sorted(GRIDS)}.")
    c = family_config(family, site, layer, width, targets)
    if "point" in args:
      (field, values), = grids(targets)[family].items()
      point = int(args["point"])
      if not 0 <= point < len(values):
        raise ValueError(f"point={point}: {family}'s grid has {len(values)} points"
                         f" ({field} = {values}).")
      (c.sae if field in c.sae else c.loss)[field] = values[point]
  else:
    families = args.get("families", "+".join(COMPARISON)).split("+")
    bad = sorted(set(families) - set(GRIDS))
    if bad:
      raise ValueError(f"families={'+'.join(bad)}: not in {sorted(GRIDS)}.")
    groups = {f: sweep.group(family_config(f, site, layer, width, targets), grids(targets)[f])
              for f in families}
    c = sweep.sweep_config(family_config(families[0], site, layer, width, targets), groups)
  if "tokens" in args:
    c.train.num_tokens = int(float(args["tokens"]))
  if "hardware" in args:
    if args["hardware"] not in LM_MESHES:
      raise ValueError(f"hardware={args['hardware']}: one of {sorted(LM_MESHES)}.")
    c.lm.mesh.data, c.lm.mesh.model = LM_MESHES[args["hardware"]]
  return c
