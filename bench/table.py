"""docs/performance.md from the measurements of every machine, one column group per machine.

Each machine's results live in `docs/performance/<machine slug>.json`:

  {"machine": "CPU AMD EPYC, 2 cores", "measured": "2026-12-03", "commit": "abc1234",
   "jax": "0.10.0", "source": "python -m bench", "commands": {"eval": ["..."]},
   "measurements": [<Measurement as a dict>, ...]}

`merge` folds a new run into a machine's file (the benchmarks that ran replace
their old rows, the others keep theirs); `render` writes the markdown: one
table per benchmark, a row per (measurement, shape), and for each machine its
tokens/s, the ratio to the baseline measured in the same run (with the target,
where the issue sets one, marked met or NOT met) and a detail.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.measurement import Measurement

# The order benchmarks appear in the table, with one line on what each one's ratio means.
BENCH_ORDER = {
    "train_step": "the train step's tokens/s against the plain matmul rate at the step's "
                  "FLOPs; the sparse rows: sparse JumpReLU step / dense step",
    "sharded_step": "the Gemma 2 9B-shaped step (3584 x 131072, batch 4096); ratio = MFU",
    "sweep": "N SAEs in one vmapped step / N sequential single-SAE runs on the same shards",
    "sparse_ops": "each gather/scatter of the sparse step / the dense matmul it replaces",
    "loader": "shard loader rows/s / a sequential read; train step fed by the loader / "
              "fed from memory",
    "eval": "delta LM loss evaluation / one clean full forward with logits, Gemma 3 270M",
    "harvest": "Gemma 3 270M harvest to shards / the bare capture forward",
    "browse": "the browse pass (LM, 16k-latent SAE, per-latent accumulators) / the harvest"
              " of the same LM, site and text",
    "lm_forward": "the Gemma 3 270M forward stopped at the hooked layer / the full forward",
}


def load(path: Path) -> dict:
  """One machine's results file; raises ValueError naming the file on a malformed one."""
  try:
    record = json.loads(path.read_text())
    record["measurements"] = [Measurement.from_json(json.dumps(m))
                              for m in record["measurements"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a performance results file ({e}); rerun"
                     " `python -m bench` on that machine or delete the file") from e
  return record


def save(path: Path, record: dict) -> None:
  """Writes `record` (as `load` returns it) to `path`, measurements one per line."""
  head = {k: v for k, v in record.items() if k != "measurements"}
  lines = ",\n".join("  " + m.to_json() for m in record["measurements"])
  text = json.dumps(head, indent=1)[:-2] + ',\n "measurements": [\n' + lines + "\n ]\n}\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def merge(old: dict | None, new: dict) -> dict:
  """`new` with the rows of benchmarks it did not run kept from `old` (same machine)."""
  if old is None:
    return new
  ran = {m.bench for m in new["measurements"]} | set(new.get("commands", {}))
  kept = [m for m in old["measurements"] if m.bench not in ran]
  commands = {**{k: v for k, v in old.get("commands", {}).items() if k not in ran},
              **new.get("commands", {})}
  return {**new, "commands": commands, "measurements": kept + new["measurements"]}


def _number(x: float | None) -> str:
  if x is None:
    return ""
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(m: Measurement) -> str:
  if m.ratio is None:
    return ""
  text = f"{m.ratio:.1%}" if m.bench == "sharded_step" else f"{m.ratio:.2f}"
  if m.met is None:
    return text
  return f"{text} (met)" if m.met else f"**{text} (NOT met)**"


def render(records: list[dict]) -> str:
  """The markdown of docs/performance.md for these machines' results files."""
  records = sorted(records, key=lambda r: (r["machine"].startswith("CPU") is False,
                                           r["machine"]))
  out = ["# Performance", "",
         "Every benchmark in `bench/` measures its baseline in the same run and prints the",
         "ratio; this file collects them, one column group per machine. Regenerate a machine's",
         "columns by running `python -m bench` on it (it writes",
         "`docs/performance/<machine>.json` and re-renders this file; `--only eval,sweep` reruns",
         "some); `python -m bench --render` re-renders from the stored files. Ratios: higher is",
         "better; a target is the issue's bar for that ratio.", "",
         "Speed defaults follow these measurements: the automatic sparse train step",
         "(`sae.sparse_capacity=-1`, `jsae.ops.sparse.MEASURED_BACKENDS`) is on only for the",
         "backends whose `train_step` sparse rows were measured here (XLA:CPU so far); on GPU",
         "and TPU `-1` means the dense step until `python -m bench` on such a machine has",
         "measured them.", "",
         "## Machines", "",
         "| machine | measured | commit | jax | how |", "|---|---|---|---|---|"]
  for r in records:
    out.append(f"| {r['machine']} | {r.get('measured', '')} | {r.get('commit', '')}"
               f" | {r.get('jax', '')} | {r.get('source', '')} |")
  benches = {m.bench for r in records for m in r["measurements"]}
  order = [b for b in BENCH_ORDER if b in benches] + sorted(benches - BENCH_ORDER.keys())
  for bench in order:
    out += ["", f"## `{bench}`", "", BENCH_ORDER.get(bench, ""), ""]
    for r in records:
      for command in r.get("commands", {}).get(bench, []):
        out.append(f"- {r['machine']}: `{command}`")
    rows: dict[tuple[str, str], dict[str, Measurement]] = {}
    for r in records:
      for m in r["measurements"]:
        if m.bench == bench:
          rows.setdefault((m.name, m.shape), {})[r["machine"]] = m
    machines = [r["machine"] for r in records
                if any(r["machine"] in by for by in rows.values())]
    head = ["measurement", "shape", "baseline"]
    for name in machines:
      head += [f"{name}: tokens/s", "ratio", "detail"]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, shape), by_machine in rows.items():
      baseline = next(iter(by_machine.values())).baseline
      cells = [name, shape, baseline]
      for machine in machines:
        m = by_machine.get(machine)
        cells += ([_number(m.tokens_per_s), _ratio(m), m.detail] if m else ["", "", ""])
      out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    targets = sorted({m.target for by in rows.values() for m in by.values() if m.target})
    if targets:
      out += ["", "Targets: " + "; ".join(targets) + "."]
  return "\n".join(out) + "\n"


def render_dir(results_dir: Path, out_file: Path) -> Path:
  """Renders every `results_dir/*.json` into `out_file`; returns `out_file`."""
  files = sorted(results_dir.glob("*.json"))
  if not files:
    raise ValueError(f"no results in {results_dir}: run `python -m bench` first")
  out_file.write_text(render([load(f) for f in files]))
  return out_file

