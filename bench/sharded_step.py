"""Sharded train step for a Gemma-2-9B-shaped SAE: memory and FLOPs per device from
the compiled program, for data-, latent- and 2-D sharding; measured where a GPU is.

    XLA_FLAGS=--xla_force_host_platform_device_count=64 python bench/sharded_step.py
    python bench/sharded_step.py --measure          # on a GPU/TPU host: time it, report MFU
    python bench/sharded_step.py --family topk      # any SAE family (default jumprelu)

Shape (d_in, d_sae, batch) = (3584, 131072, 4096) by default; a step counts
2 * batch * d_in * d_sae FLOPs per matmul of that size (the family's
`step_matmuls`: 5, or 8 for Gated). The Gemma Scope reference: 45 ms per step at
50.8% MFU on 8 TPUv3 chips; the target is >= 60% MFU on one H100 (bfloat16 matmuls).
Faked CPU devices compile the real partitioned program, so the per-device
memory and the collectives are those of the real mesh; only timings need hardware.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ of this checkout
from configs import default  # pylint: disable=wrong-import-position
from jsae import optim, saes, sharding, train
from bench.measurement import Measurement, emit, machine  # pylint: disable=wrong-import-position

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v3": 123.0,
                    "TPU v4": 275.0, "TPU v5p": 459.0}


def _compiled(config, mesh):
  optimizer = optim.make_optimizer(config.optim, total_steps=10**6)
  settings = train.StepSettings.from_config(config, norm_scale=1.0)
  init = functools.partial(train.create_state, config=config, optimizer=optimizer)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.named(mesh, sharding.state_specs(abstract, saes.get(config.sae.family)))
  batch_sh = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
  step = jax.jit(functools.partial(train.train_step, hparams=train.hyperparams(config),
                                   settings=settings, optimizer=optimizer,
                                   with_metrics=False),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=0)
  batch = jax.ShapeDtypeStruct((config.data.batch_size, config.sae.d_in), np.float32)
  return step, step.lower(abstract, batch).compile(), init, state_sh, batch_sh


def analyse(d_in, d_sae, batch, data, model, dtype, devices, family="jumprelu"):
  config = default.get_config(f"family={family}")
  config.sae.d_in, config.sae.d_sae, config.sae.compute_dtype = d_in, d_sae, dtype
  config.data.batch_size = batch
  mesh = sharding.make_mesh(ConfigDict(dict(data=data, model=model)), devices)
  sharding.check_divisible(mesh, d_sae=d_sae, batch_size=batch)
  t = time.perf_counter()
  step, compiled, init, state_sh, batch_sh = _compiled(config, mesh)
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_device_gib = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2**30
  return dict(mesh=f"{data}x{model}", devices=data * model, compile_s=compile_s,
              mem_gib=per_device_gib, temp_gib=mem.temp_size_in_bytes / 2**30,
              flops=float(cost.get("flops", float("nan"))),
              step=step, init=init, state_sh=state_sh, batch_sh=batch_sh, config=config)


def measure(r, steps: int = 20) -> tuple[float, float]:
  """(seconds per train step, seconds per loss forward+backward alone) on real devices."""
  state = jax.jit(r["init"], out_shardings=r["state_sh"])(jax.random.key(0))
  c = r["config"]
  x = jax.device_put(np.random.default_rng(0).standard_normal(
      (c.data.batch_size, c.sae.d_in), np.float32) / np.sqrt(c.sae.d_in), r["batch_sh"])
  settings = train.StepSettings.from_config(c, norm_scale=1.0)
  dead = np.zeros(c.sae.d_sae, bool)
  hparams = train.hyperparams(c)
  grad_fn = jax.jit(jax.grad(lambda p, x: saes.get(c.sae.family).loss(
      p, state.family_state, x, settings=settings.loss, hparams=hparams, dead=dead,
      step=state.step)[0]))

  def per_call(fn, carry) -> float:
    carry = fn(carry)  # compile, warm up
    jax.block_until_ready(carry)
    t = time.perf_counter()
    for _ in range(steps):
      carry = fn(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - t) / steps

  grad_s = per_call(lambda _: grad_fn(state.params, x), None)
  step_s = per_call(lambda s: r["step"](s, x)[0], state)  # donates `state`: last
  return step_s, grad_s


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="3584x131072x4096")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--measure", action="store_true", help="time the step on real devices")
  p.add_argument("--family", default="jumprelu", choices=saes.names())
  p.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = p.parse_args()
  host = machine()
  d_in, d_sae, batch = map(int, args.shape.split("x"))
  n = jax.device_count()
  step_flops = saes.get(args.family).step_matmuls * 2 * batch * d_in * d_sae
  print(f"{jax.device_count()} {jax.devices()[0].device_kind} device(s); {args.family} SAE"
        f" {d_in}x{d_sae},"
        f" batch {batch}, {args.dtype} matmuls; {step_flops / 1e12:.2f} TFLOP per step")
  print(f"{'devices':>7} {'mesh':>7} {'GiB/device':>10} {'temp GiB':>9} {'TFLOP/dev':>9}"
        f" {'compile s':>9}" + (f" {'step ms':>8} {'MFU':>6} {'fwd+bwd ms':>10}" if args.measure else ""))
  for count in sorted({min(8, n), n}):
    devices = jax.devices()[:count]
    for data, model in [(count, 1), (1, count), (2, count // 2)]:
      if count == 1 and (data, model) != (1, 1):
        continue
      try:
        r = analyse(d_in, d_sae, batch, data, model, args.dtype, devices, args.family)
      except Exception as e:  # e.g. a shape the mesh cannot divide
        print(f"{count:>7} {data}x{model:<5} skipped: {str(e).splitlines()[0][:80]}")
        continue
      line = (f"{count:>7} {r['mesh']:>7} {r['mem_gib']:10.2f} {r['temp_gib']:9.2f}"
              f" {r['flops'] / 1e12:9.2f} {r['compile_s']:9.1f}")
      tokens_per_s = peak_tokens_per_s = mfu = None
      detail = f"{r['mem_gib']:.2f} GiB/device compiled"
      if args.measure:
        s, grad_s = measure(r)
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), float("nan"))
        mfu = step_flops / s / (peak * 1e12 * count)
        tokens_per_s, peak_tokens_per_s = batch / s, batch * peak * 1e12 * count / step_flops
        line += f" {1e3 * s:8.1f} {mfu:6.1%} {1e3 * grad_s:10.1f}"
        detail += f"; {1e3 * s:.1f} ms/step, fwd+bwd {1e3 * grad_s:.1f} ms"
      print(line)
      emit([Measurement(
          bench="sharded_step", name=f"{args.family} step, {args.dtype}, mesh {r['mesh']}",
          shape=args.shape, tokens_per_s=tokens_per_s,
          baseline="the devices' peak bf16 rate (ratio = MFU)",
          baseline_tokens_per_s=peak_tokens_per_s, ratio=mfu, machine=host,
          target="MFU >= 0.55 (one H100/H200)" if args.measure and count == 1 else "",
          met=(bool(mfu >= 0.55) if args.measure and count == 1 else None),
          detail=detail)], args.json)


if __name__ == "__main__":
  main()
