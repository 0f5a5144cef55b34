"""An N-member sweep in one compiled step against N sequential single-SAE runs, same data.

    python bench/sweep.py [--shapes 64x512x256,512x4096x1024] [--members 8]
                          [--steps 50,5] [--family jumprelu] [--dtype float32]

Both sides train N JumpReLU SAEs (N sparsity coefficients) for the same steps
from activation shards on disk (written first, in a temporary directory):

  sequential  one jitted single-SAE step, compiled once (the coefficient is a traced
              argument), run member after member; every member reads every batch
              from the shard loader (SAELens's runner and dictionary_learning
              share a stream but still step one SAE at a time).
  sweep       `jsae.sweep.group_step`: the N members stacked on a leading axis in one
              compiled step, each batch read once; `--loop vmap` batches the members'
              matmuls, `--loop map` runs the members one after another inside the
              step (`lax.map`); `auto` (the default, as `config.sweep.member_loop`)
              is map on CPU, vmap elsewhere.

Printed: seconds per (step of all N members) for each side, excluding compilation
(shown apart), and sequential / sweep (the speed-up). The gain is the N - 1 saved
reads and dispatches and a fuller device: large on an accelerator that one small SAE
underfills, small where the matmuls already saturate it. On 2 CPU cores with vmap
(8 members): 1.24 at 64x512x256, 0.90 at 640x16384x4096, where XLA:CPU's batched
matmuls cost ~10-20% (a vmapped [8, 1024, 512] x [8, 512, 4096] alone: 0.79 of eight
separate matmuls); `map` avoids them (docs/performance.md has both). Neither side
writes checkpoints or logs. On an accelerator the MFU of both sides is printed too.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ of this checkout
from configs import default  # pylint: disable=wrong-import-position
from jsae import data, optim, saes, sweep, train
from jsae.data.shards import ShardWriter
from bench.measurement import Measurement, at_least, emit, machine  # pylint: disable=wrong-import-position

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _config(family, d_in, d_sae, batch, dtype, shards_dir, steps):
  c = default.get_config(f"family={family}")
  c.sae.d_in, c.sae.d_sae, c.sae.compute_dtype = d_in, d_sae, dtype
  c.data.batch_size, c.data.source, c.data.shards_dir = batch, "shards", str(shards_dir)
  c.train.num_tokens = steps * batch
  c.mesh.data = c.mesh.model = 1
  return c


def _write_shards(directory, d_in, rows):
  rng = np.random.default_rng(0)
  with ShardWriter(directory, d_in=d_in, rows_per_shard=min(rows, 1 << 16)) as w:
    for start in range(0, rows, 1 << 14):
      n = min(1 << 14, rows - start)
      w.write((rng.standard_normal((n, d_in)) / np.sqrt(d_in)).astype(np.float32))


def _knob(family):
  field = "k" if "k" in saes.get(family).fields.get("sae", {}) else "sparsity_coeff"
  return field, ((8, 16, 24, 32, 48, 64, 96, 128) if field == "k"
                 else tuple(float(x) for x in np.geomspace(1e-4, 1e-2, 8)))


def bench_shape(family, d_in, d_sae, batch, members, steps, dtype, loop="vmap") -> dict:
  """Times both sides on one shape; returns the figures."""
  with tempfile.TemporaryDirectory() as tmp:
    _write_shards(Path(tmp) / "acts", d_in, rows=batch * (steps + 1))
    base = _config(family, d_in, d_sae, batch, dtype, Path(tmp) / "acts", steps)
    field, values = _knob(family)
    values = values[:members] + values[:max(0, members - len(values))]
    sweep_config = sweep.sweep_config(base, {family: sweep.group(
        base, {field: values[:members], "seed": tuple(range(members))}, mode="zip")})
    (group,) = sweep.plan(sweep_config)
    source = data.make_source(group.config)
    total = train.config_lib.total_steps(group.config)
    settings = train.StepSettings.from_config(group.config, source.norm_scale)

    # Sequential: one compiled single-SAE step, hyperparameters traced.
    optimizer = optim.make_optimizer(group.config.optim, total_steps=total)
    single = jax.jit(functools.partial(train.train_step, settings=settings, optimizer=optimizer,
                                       with_metrics=False), donate_argnums=0)
    init = jax.jit(functools.partial(train.create_state, config=group.config, optimizer=optimizer))
    t = time.perf_counter()
    m0 = group.members[0]
    jax.block_until_ready(single(init(jax.random.key(0)), jnp.asarray(source.batch(0)),
                                 train.hyperparams(m0.config))[0])
    single_compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for m in group.members:
      state = init(jax.random.key(int(m.config.seed)))
      hp = jax.device_put(train.hyperparams(m.config))
      for step in range(steps):
        state, _ = single(state, jnp.asarray(source.batch(step)), hp)
      jax.block_until_ready(state.params)
    sequential_s = (time.perf_counter() - t) / steps

    # Sweep: every member in one vmapped step, one read per step.
    step_fn = jax.jit(functools.partial(sweep.group_step, settings=settings, loop=loop,
                                        optim_config=group.config.optim, total_steps=total,
                                        with_metrics=False), donate_argnums=0)
    hparams = jax.device_put(sweep.group_hyperparams(group))
    init_group = jax.jit(functools.partial(sweep.init_group, group, total_steps=total))
    t = time.perf_counter()
    jax.block_until_ready(step_fn(init_group(), jnp.asarray(source.batch(0)), hparams)[0])
    sweep_compile_s = time.perf_counter() - t
    state = init_group()
    t = time.perf_counter()
    for step in range(steps):
      state, _ = step_fn(state, jnp.asarray(source.batch(step)), hparams)
    jax.block_until_ready(state.members.params)
    sweep_s = (time.perf_counter() - t) / steps
    source.close()
  flops = members * step_flops(family, d_in, d_sae, batch)
  return dict(shape=f"{d_in}x{d_sae}x{batch}", members=members, steps=steps,
              sequential_s=sequential_s, sweep_s=sweep_s, ratio=sequential_s / sweep_s,
              single_compile_s=single_compile_s, sweep_compile_s=sweep_compile_s,
              flops=flops)


def step_flops(family, d_in, d_sae, batch) -> float:
  return saes.get(family).step_matmuls * 2 * batch * d_in * d_sae


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="64x512x256,512x4096x1024",
                 help="d_in x d_sae x batch (comma list)")
  p.add_argument("--steps", default="50,5", help="steps per shape (comma list)")
  p.add_argument("--members", type=int, default=8)
  p.add_argument("--family", default="jumprelu", choices=saes.names())
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--loop", default="auto", choices=sweep.MEMBER_LOOPS,
                 help="how the sweep step runs its members (config.sweep.member_loop)")
  p.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = p.parse_args()
  host = machine()
  loop = args.loop if args.loop != "auto" else (
      "map" if jax.default_backend() == "cpu" else "vmap")
  shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
  steps = [int(s) for s in args.steps.split(",")]
  steps += [steps[-1]] * (len(shapes) - len(steps))
  kind = jax.devices()[0].device_kind
  print(f"{kind}; {args.members} x {args.family}, {args.dtype} matmuls, member loop {loop};"
        " seconds per step of all members (compile excluded)")
  print(f"{'shape':>18} {'steps':>5} {'sequential s':>12} {'sweep s':>8} {'ratio':>6}"
        f" {'compile 1 / sweep s':>19} {'sweep GFLOP/s':>13}")
  for (d_in, d_sae, batch), n in zip(shapes, steps):
    r = bench_shape(args.family, d_in, d_sae, batch, args.members, n, args.dtype, loop)
    line = (f"{r['shape']:>18} {n:>5} {r['sequential_s']:12.3f} {r['sweep_s']:8.3f}"
            f" {r['ratio']:6.2f} {r['single_compile_s']:9.1f} / {r['sweep_compile_s']:<7.1f}"
            f" {r['flops'] / r['sweep_s'] / 1e9:13.1f}")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    detail = f"compile {r['single_compile_s']:.1f} s single / {r['sweep_compile_s']:.1f} s sweep"
    if peak:
      mfu = (f"MFU sweep {r['flops'] / r['sweep_s'] / (peak * 1e12):.1%},"
             f" sequential {r['flops'] / r['sequential_s'] / (peak * 1e12):.1%}")
      line, detail = f"{line}  {mfu}", f"{detail}; {mfu}"
    print(line)
    target, met = at_least(r["ratio"], 1.0) if jax.default_backend() == "cpu" else ("", None)
    emit([Measurement(
        bench="sweep", name=f"{args.members} x {args.family} in one step ({loop}), {args.dtype}",
        shape=r["shape"], tokens_per_s=args.members * batch / r["sweep_s"],
        baseline=f"{args.members} sequential single-SAE runs",
        baseline_tokens_per_s=args.members * batch / r["sequential_s"], ratio=r["ratio"],
        machine=host, target=target, met=met, detail=detail)], args.json)


if __name__ == "__main__":
  main()
