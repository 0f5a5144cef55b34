"""Runs every benchmark on this machine and regenerates docs/performance.md.

    python -m bench                    # the whole suite for this machine (CPU or accelerator)
    python -m bench --only eval,sweep  # some benchmarks; the others keep their stored rows
    python -m bench --list             # the commands it would run
    python -m bench --render           # re-render docs/performance.md from the stored files

Each benchmark runs as its own process (`python bench/<name>.py ... --json`), its
human table streamed here; its JSON lines (`bench.measurement.Measurement`) are
collected into `docs/performance/<machine>.json` (the benchmarks that ran
replace their old rows), and `docs/performance.md` is rendered from every
machine's file. A benchmark that fails is reported and the rest still run; the
exit status is then 1 and the failed benchmark's stored rows are kept.
The suite takes about 25 minutes on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench import table
from bench.measurement import Measurement, machine, machine_slug

ROOT = Path(__file__).resolve().parents[1]

# (benchmark, arguments) per kind of machine: the shapes the issues set targets on.
CPU_SUITE = [
    ("train_step", "--family all --shapes 640x16384x4096"),
    ("train_step", "--sparse 10,25,50,100,200,400 --shapes 640x16384x4096"),
    ("train_step", "--sparse 32,128,256 --family topk,batchtopk --shapes 640x16384x4096"),
    ("sparse_ops", ""),
    ("sweep", "--shapes 64x512x256,640x16384x4096 --steps 50,3 --loop vmap"),
    ("sweep", "--shapes 64x512x256,640x16384x4096 --steps 50,3 --loop map"),
    ("loader", ""),
    ("eval", "--contexts 8"),
    ("harvest", ""),
    ("browse", "--contexts 32"),
    ("lm_forward", ""),
    # The LM on fake CPU devices: the mesh's overhead (they share the host's 2 cores).
    ("lm_forward", "--mesh 2x4 --batch 4"),
    ("lm_forward", "--mesh 8x1 --batch 8"),
]
ACCELERATOR_SUITE = [
    ("train_step", "--dtype bfloat16 --shapes 2304x16384x4096,3584x131072x4096"),
    ("train_step", "--dtype bfloat16 --family all --shapes 2304x16384x4096"),
    ("train_step", "--sparse 30,70,150 --family all --shapes 3584x131072x4096"),
    ("sharded_step", "--measure"),
    ("sweep", "--dtype bfloat16 --shapes 640x16384x4096,2304x16384x4096 --steps 20,20"
     " --loop vmap"),
    ("loader", ""),
    ("eval", "--contexts 32 --memory_mb 16384 --forward_batch 8"),
    ("harvest", "--contexts 64 --batch 8"),
    ("browse", "--contexts 32 --batch 8"),
    ("lm_forward", "--batch 16"),
]


def suite(on_accelerator: bool, only: set[str] | None) -> list[tuple[str, str]]:
  """The (benchmark, arguments) to run here; raises ValueError on an unknown name in `only`."""
  chosen = ACCELERATOR_SUITE if on_accelerator else CPU_SUITE
  if only:
    known = {name for name, _ in chosen}
    if unknown := only - known:
      raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; this machine's suite has"
                       f" {sorted(known)}")
    chosen = [(name, a) for name, a in chosen if name in only]
  return chosen


def command(name: str, args: str) -> list[str]:
  """The argv that runs one benchmark with JSON output."""
  return [sys.executable, f"bench/{name}.py", *shlex.split(args), "--json"]


def run_one(name: str, args: str) -> tuple[list[Measurement], int]:
  """Runs one benchmark, echoing its table; (its measurements, its exit status)."""
  argv = command(name, args)
  print(f"\n$ {shlex.join(argv[1:])}", flush=True)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
  found = []
  assert proc.stdout is not None
  for line in proc.stdout:
    if line.startswith("{"):
      found.append(Measurement.from_json(line))
    else:
      print(line, end="", flush=True)
  return found, proc.wait()


def _commit() -> str:
  """The checkout's short commit, with "+changes" when the tree differs from it."""
  def git(*a):
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  sha = git("rev-parse", "--short", "HEAD") or "unknown"
  return sha + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default="", help="comma-separated benchmark names")
  ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
  ap.add_argument("--render", action="store_true", help="only re-render the markdown")
  ap.add_argument("--results", default="docs/performance", help="per-machine results folder")
  ap.add_argument("--out", default="docs/performance.md", help="the rendered table")
  args = ap.parse_args(argv)
  results_dir, out_file = ROOT / args.results, ROOT / args.out
  try:
    if args.render:
      print(f"wrote {table.render_dir(results_dir, out_file)}")
      return 0
    import jax  # pylint: disable=import-outside-toplevel
    host = machine()
    chosen = suite(jax.default_backend() != "cpu", set(filter(None, args.only.split(","))))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.list:
    for name, a in chosen:
      print(shlex.join(command(name, a)[1:]))
    return 0

  measurements, commands, failed = [], {}, set()
  for name, a in chosen:
    found, rc = run_one(name, a)
    if rc:
      failed.add(name)
    measurements += found
    commands.setdefault(name, []).append(shlex.join(command(name, a)[1:-1]))
  # A benchmark with a failed invocation keeps all its stored rows (none half-replaced).
  new = dict(machine=host, measured=datetime.date.today().isoformat(), commit=_commit(),
             jax=jax.__version__, source="python -m bench",
             commands={k: v for k, v in commands.items() if k not in failed},
             measurements=[m for m in measurements if m.bench not in failed])
  path = results_dir / f"{machine_slug(host)}.json"
  table.save(path, table.merge(table.load(path) if path.exists() else None, new))
  print(f"\nwrote {path} ({len(new['measurements'])} measurements) and"
        f" {table.render_dir(results_dir, out_file)}")
  if failed:
    print(f"FAILED (their stored rows kept): {sorted(failed)}", file=sys.stderr)
    return 1
  return 0

if __name__ == "__main__":
  sys.exit(main())
