"""The family contract is the one place a family's specifics live, and the SAE object
stands alone: checked on the source, so that a regression fails here."""

import ast
import io
import tokenize
from pathlib import Path

import pytest

from jsae import saes
from jsae.saes import base

PACKAGE = Path(__file__).resolve().parent.parent / "jsae"

# Where family names may appear: the families themselves, and the formats' own
# mappings of families to their architecture names.
FAMILY_HOMES = ("saes", "formats")
# The LM's code names its own weights ('k': the key projection); the straight-through
# op `jumprelu` is public API and is exported under that name.
OTHER_MEANINGS = {("lm", "*"): "the LM's weights", ("ops", "*"): "the op jsae.jumprelu",
                  ("__init__.py", "jumprelu"): "the op jsae.jumprelu",
                  ("dryrun.py", "k"): "the SI prefix kilo",
                  ("browse/logits.py", "k"): "the number of top logits a latent shows"}


def _family_words() -> tuple[set[str], set[str]]:
  """(family names, names of family-specific config fields)."""
  common = {f for fs in base.COMMON_FIELDS.values() for f in fs}
  fields = {n for name in saes.names() for g in saes.get(name).fields.values() for n in g}
  return set(saes.names()), fields - common


def _allowed(rel: Path, word: str) -> bool:
  top = rel.parts[0]
  return (top in FAMILY_HOMES or (top, "*") in OTHER_MEANINGS
          or (str(rel), word) in OTHER_MEANINGS)


def family_mentions(root: Path = PACKAGE) -> list[str]:
  """'file:line: word' for each string literal naming a family or a family field, and
  each `sae.FIELD` / `loss.FIELD` access of a family field, outside the allowed places."""
  names, fields = _family_words()
  found = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, t in enumerate(tokens):
      word = None
      if t.type == tokenize.STRING:
        try:
          value = ast.literal_eval(t.string)
        except (ValueError, SyntaxError):
          continue
        if isinstance(value, str) and (value in names or value in fields):
          word = value
      elif (t.type == tokenize.NAME and t.string in fields and i >= 2
            and tokens[i - 1].string == "." and tokens[i - 2].string in ("sae", "loss")):
        word = t.string
      if word is not None and not _allowed(rel, word):
        found.append(f"{rel}:{t.start[0]}: {word}")
  return found


def test_no_family_name_or_field_outside_the_families():
  assert family_mentions() == []


def test_the_check_finds_a_planted_special_case(tmp_path):
  (tmp_path / "report.py").write_text(
      'def knob(c):\n  if "sparsity_coeff" in c["loss"]:\n    return c.loss.sparsity_coeff\n'
      '  return "topk"\n')
  (tmp_path / "formats").mkdir()
  (tmp_path / "formats" / "x.py").write_text('NAMES = {"topk": "topk"}\n')
  assert family_mentions(tmp_path) == ["report.py:2: sparsity_coeff",
                                       "report.py:3: sparsity_coeff", "report.py:4: topk"]


def _module_imports(path: Path) -> set[str]:
  """The jsae modules and top-level packages `path` imports at module level."""
  tree = ast.parse(path.read_text())
  out = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      if node.module.startswith("jsae"):  # `from jsae import x` imports jsae.x
        out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def transitive_imports(module: str) -> set[str]:
  """Every module `module` imports, following jsae's own modules (not the package's
  `jsae/__init__.py`, which gathers the public API)."""
  seen, todo = set(), [module]
  while todo:
    name = todo.pop()
    parts = name.split(".")
    path = PACKAGE.joinpath(*parts[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.is_file():
      continue
    for imported in _module_imports(path):
      if imported not in seen:
        seen.add(imported)
        if imported.startswith("jsae.") or imported == "jsae.saes":
          todo.append(imported)
  return seen


@pytest.mark.parametrize("module", ["jsae.sae", "jsae.saes"])
def test_the_inference_object_stands_alone(module):
  imported = transitive_imports(module)
  assert "jsae.sae" in transitive_imports("jsae.runs")  # the check follows imports
  bad = sorted(m for m in imported if m.split(".")[0] == "orbax"
               or m in ("jsae.runs", "jsae.checkpoint", "jsae.train", "jsae.loop"))
  assert bad == []
