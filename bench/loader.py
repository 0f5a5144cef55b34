"""ShardLoader throughput against a sequential read of the same files, in the same run.

    python bench/loader.py [--gib 1.5] [--d-in 2304] [--batch-size 4096] [--dir DIR]

Writes ~`--gib` GiB of float32 shards to a temporary directory (deleted after;
the files stay page-cached, which is the case the loader is built for), then
measures on the same files:

  write       ShardWriter.write + finalize (CRC-32, norms, fsync per shard)
  sequential  plain 16 MiB `readinto` of every shard file (the baseline)
  crc32       the checksum the loader runs at first open of each shard
  read        ShardLoader.read(step): shuffled rows, no prefetch thread; the
              first epoch includes first-touch page mapping, the second not
  batch       ShardLoader.batch(step) in step order through the prefetch thread
  overlap     batch(step) with a consumer that sleeps (GIL released, like a
              train step) as long as one read takes: prefetch should hide it

and prints GiB/s, rows/s and each one's ratio to the sequential read.
Target: `batch` >= 1 GiB/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jsae.data import loader as loader_lib
from jsae.data import shards as shards_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bench/
from bench.measurement import Measurement, emit, machine  # pylint: disable=wrong-import-position

GIB = 2**30


def write_dataset(directory: Path, *, gib: float, d_in: int, rows_per_shard: int) -> float:
  """Writes ~`gib` GiB of random float32 rows; returns seconds taken."""
  rows_total = int(gib * GIB) // (4 * d_in)
  block = np.random.default_rng(0).standard_normal((4096, d_in), dtype=np.float32)
  t = time.perf_counter()
  with shards_lib.ShardWriter(directory, d_in=d_in, rows_per_shard=rows_per_shard,
                              provenance=dict(model="bench/random")) as w:
    done = 0
    while done < rows_total:
      n = min(block.shape[0], rows_total - done)
      w.write(block[:n])
      done += n
  return time.perf_counter() - t


def sequential_read(directory: Path, manifest: shards_lib.Manifest) -> float:
  """Seconds to read every shard file front to back into one reused buffer."""
  buf = bytearray(16 << 20)
  t = time.perf_counter()
  for s in manifest.shards:
    with open(directory / s.file, "rb", buffering=0) as f:
      while f.readinto(buf):
        pass
  return time.perf_counter() - t


def checksum_all(directory: Path, manifest: shards_lib.Manifest) -> float:
  """Seconds to CRC-32 every shard file."""
  t = time.perf_counter()
  for s in manifest.shards:
    shards_lib.file_crc32(directory / s.file)
  return time.perf_counter() - t


def timed_steps(fn, steps: range) -> float:
  """Seconds to call `fn(step)` for every step."""
  t = time.perf_counter()
  for s in steps:
    fn(s)
  return time.perf_counter() - t


def bench_train_step_with_loader(directory: Path, *, d_sae: int, batch_size: int,
                                  steps: int) -> tuple[float, float]:
  """Seconds per train step fed by ShardLoader, and fed from an in-memory batch.

  The same jitted step (what the trainer runs between log steps) and the same
  number of steps; the loader's prefetch thread overlaps reading with compute.
  """
  import functools
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # configs/ of this checkout
  from configs import default
  from jsae import optim, train

  m = shards_lib.load_manifest(directory)
  config = default.get_config()
  config.sae.d_in, config.sae.d_sae, config.data.batch_size = m.d_in, d_sae, batch_size
  opt = optim.make_optimizer(config.optim, total_steps=10**6)
  settings = train.StepSettings.from_config(config, norm_scale=m.norm_scale)
  init = jax.jit(functools.partial(train.create_state, config=config, optimizer=opt))
  step = jax.jit(functools.partial(train.train_step, hparams=train.hyperparams(config),
                                   settings=settings, optimizer=opt, with_metrics=False),
                 donate_argnums=0)
  ld = loader_lib.ShardLoader(directory, batch_size=batch_size, seed=0, process_index=0,
                              process_count=1, prefetch=4, verify="none")
  in_memory = jnp.asarray(ld.read(0))

  def run(feed) -> float:
    state = init(jax.random.key(0))
    state, _ = step(state, feed(0))  # compile
    jax.block_until_ready(state)
    t = time.perf_counter()
    for i in range(1, steps + 1):
      state, _ = step(state, feed(i))
    jax.block_until_ready(state)
    return (time.perf_counter() - t) / steps

  memory_s = run(lambda i: in_memory)
  loader_s = run(lambda i: jnp.asarray(ld.batch(i)))
  ld.close()
  return loader_s, memory_s


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gib", type=float, default=1.5, help="dataset size in GiB")
  p.add_argument("--d-in", type=int, default=2304)
  p.add_argument("--batch-size", type=int, default=4096)
  p.add_argument("--rows-per-shard", type=int, default=16384)
  p.add_argument("--dir", default=None, help="parent of the temporary dataset directory")
  p.add_argument("--repeats", type=int, default=2, help="passes of the sequential read")
  p.add_argument("--d-sae", type=int, default=4096, help="SAE width for the train-step run")
  p.add_argument("--train-steps", type=int, default=20, help="train steps per feed (0: skip)")
  p.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = p.parse_args()

  tmp = Path(tempfile.mkdtemp(prefix="jsae-bench-loader-", dir=args.dir))
  try:
    write_s = write_dataset(tmp, gib=args.gib, d_in=args.d_in,
                            rows_per_shard=args.rows_per_shard)
    m = shards_lib.load_manifest(tmp)
    nbytes, n = m.nbytes, m.num_rows
    seq_s = min(sequential_read(tmp, m) for _ in range(args.repeats))
    crc_s = checksum_all(tmp, m)

    ld = loader_lib.ShardLoader(tmp, batch_size=args.batch_size, seed=0, process_index=0,
                                process_count=1, prefetch=4, verify="none")
    steps = int(n // args.batch_size)  # one epoch
    bb = args.batch_size * m.row_nbytes
    read1_s = timed_steps(ld.read, range(steps))
    read2_s = timed_steps(ld.read, range(steps, 2 * steps))
    ld.batch(2 * steps)  # starts the prefetch thread
    time.sleep(0.5)      # let it fill the queue, as it would during a train step
    batch_s = timed_steps(ld.batch, range(2 * steps + 1, 3 * steps + 1))
    # Overlap: a consumer busy (GIL released, like a jitted train step) for the
    # direct read time per batch; ideal wall time per step is that busy time.
    busy = read2_s / steps
    def consume(step):
      ld.batch(step)
      time.sleep(busy)
    overlap_s = timed_steps(consume, range(3 * steps + 1, 4 * steps + 1))
    ld.close()
    # Per-batch cost split: index computation (Feistel + sort) alone.
    idx_s = timed_steps(lambda s: np.argsort(loader_lib.row_indices(
        s, num_rows=n, batch_size=args.batch_size, seed=0)), range(steps))

    rows = [
        ("write (ShardWriter)", nbytes, write_s),
        ("sequential read", nbytes, seq_s),
        ("crc32 (first-open check)", nbytes, crc_s),
        ("loader.read, epoch 1", steps * bb, read1_s),
        ("loader.read, epoch 2", steps * bb, read2_s),
        ("loader.batch (prefetch)", steps * bb, batch_s),
    ]
    print(f"dataset: {n:,} rows x d_in {args.d_in} float32 = {nbytes / GIB:.2f} GiB in"
          f" {len(m.shards)} shards; batch {args.batch_size} rows"
          f" ({bb / 2**20:.1f} MiB); page-cached")
    print(f"{'measure':<28}{'GiB/s':>8}{'Mrows/s':>9}{'vs seq':>8}")
    for name, b, s in rows:
      print(f"{name:<28}{b / s / GIB:>8.2f}{b / m.row_nbytes / s / 1e6:>9.3f}"
            f"{(b / s) / (nbytes / seq_s):>8.2f}")
    print(f"index computation (Feistel + argsort): {1e3 * idx_s / steps:.2f} ms/batch")
    print(f"overlap: with a consumer busy {1e3 * busy:.1f} ms per step (GIL released), a step"
          f" takes {1e3 * overlap_s / steps:.1f} ms (serial would be"
          f" {2e3 * busy:.1f} ms, ideal {1e3 * busy:.1f} ms)")
    host, shape = machine(), f"d_in {args.d_in}, batch {args.batch_size}, {nbytes / GIB:.2f} GiB"
    seq_rows_s = n / seq_s
    batch_gib_s = steps * bb / batch_s / GIB
    records = [Measurement(
        bench="loader", name="loader.batch (shuffled, prefetch thread)", shape=shape,
        tokens_per_s=steps * args.batch_size / batch_s, baseline="sequential read of the files",
        baseline_tokens_per_s=seq_rows_s, ratio=(steps * args.batch_size / batch_s) / seq_rows_s,
        machine=host, target="batch >= 1 GiB/s", met=bool(batch_gib_s >= 1.0),
        detail=f"{batch_gib_s:.2f} GiB/s served")]
    if args.train_steps:
      loader_s, memory_s = bench_train_step_with_loader(
          tmp, d_sae=args.d_sae, batch_size=args.batch_size, steps=args.train_steps)
      print(f"train step (d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch_size}):"
            f" {args.batch_size / loader_s:,.0f} tokens/s with the loader vs"
            f" {args.batch_size / memory_s:,.0f} from memory: ratio {memory_s / loader_s:.3f}"
            " (target >= 0.95)")
      records.append(Measurement(
          bench="loader", name="train step fed by the loader", shape=f"{shape}, d_sae {args.d_sae}",
          tokens_per_s=args.batch_size / loader_s, baseline="the same step fed from memory",
          baseline_tokens_per_s=args.batch_size / memory_s, ratio=memory_s / loader_s,
          machine=host, target="ratio >= 0.95", met=bool(memory_s / loader_s >= 0.95)))
    emit(records, args.json)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
