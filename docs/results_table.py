"""The markdown table of docs/results.md from an evaluated sweep directory.

  python docs/results_table.py runs/sweep_gemma3      # after `jsae eval --sae=runs/sweep_gemma3`

One row per member (family, name, L0, FVU, delta LM loss, loss recovered, dead
fraction) from members/*/eval.json, sorted by family and L0; then the clean CE,
the zero-ablation delta and the number of target tokens the LM numbers rest on.
"""

import json
import sys
from pathlib import Path


def main(root: Path) -> None:
  rows, first = [], None
  for member in sorted((root / "members").iterdir()):
    if not (member / "eval.json").is_file():
      raise SystemExit(f"{member} has no eval.json: run jsae eval --sae={root} first.")
    e = json.loads((member / "eval.json").read_text())
    first = first or e
    family = json.loads((member / "config.json").read_text())["sae"]["family"]
    rows.append((family, member.name, e["l0"], e["fvu"], e["delta_lm_loss"],
                 e["loss_recovered"], e["dead_frac"]))
  rows.sort(key=lambda r: (r[0], r[2]))
  print("| family | member | L0 | FVU | delta LM loss (nats) | loss recovered | dead |")
  print("|---|---|---|---|---|---|---|")
  for family, name, l0, fvu, delta, recovered, dead in rows:
    print(f"| {family} | {name} | {l0:.1f} | {fvu:.3f} | {delta:.3f} | {recovered:.3f} |"
          f" {dead:.2f} |")
  print(f"\nclean CE {first['ce_clean']:.3f} nats, zero-ablation delta"
        f" {first['delta_lm_loss_zero']:.3f} nats, {first['lm_targets']} target tokens")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  main(Path(sys.argv[1]))
