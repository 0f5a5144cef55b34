"""SentencePiece tokenizer for Gemma, from a `.model` file or rebuilt from GGUF.

A GGUF file carries the full vocabulary (pieces, scores, piece types) but not
the SentencePiece model proto, so `Tokenizer.from_gguf` rebuilds one: a BPE
model with byte fallback, identity normaliser, no dummy prefix, whitespace
escaped as U+2581, and Gemma's special ids (pad 0, eos 1, bos 2, unk from the
file). The rebuilt proto is cached as `<gguf stem>.tokenizer.model` next to
the GGUF file, because parsing the 262k-entry vocabulary takes ~10 s and the
cached file loads in well under a second.

Needs the optional `sentencepiece` (and `gguf` for GGUF) packages:
`pip install 'jsae[models]'`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["Tokenizer", "proto_from_gguf", "gguf_tokenizer_cache_path",
           "write_atomic"]

# Gemma's fixed special ids (GGUF records them too; these are the fallbacks).
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def _spm():
  try:
    import sentencepiece  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "jsae.lm.tokenizer needs sentencepiece: pip install 'jsae[models]'"
        " (or pip install sentencepiece).") from e
  return sentencepiece


class Tokenizer:
  """A SentencePiece processor with Gemma's special ids.

  Attributes:
    bos_id, eos_id, pad_id, unk_id: special token ids.
    vocab_size: number of pieces.
  """

  def __init__(self, model_proto: bytes):
    """Builds the tokenizer from a serialised SentencePiece ModelProto."""
    self._proto = bytes(model_proto)
    self._sp = _spm().SentencePieceProcessor(model_proto=self._proto)
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    # A .model without a pad piece reports -1; Gemma's pad is id 0.
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else PAD_ID
    self.vocab_size = int(self._sp.get_piece_size())

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a SentencePiece `.model` file."""
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(
          f"SentencePiece model {str(path)!r} not found; pass the path of a"
          f" tokenizer .model file, or use Tokenizer.from_gguf(gguf_path).")
    return cls(path.read_bytes())

  @classmethod
  def from_gguf(cls, path: str | os.PathLike, *, cache: bool = True,
                cache_path: str | os.PathLike | None = None) -> "Tokenizer":
    """Rebuilds the tokenizer from a GGUF file's vocabulary (cached next to it)."""
    path = Path(path)
    cache_path = Path(cache_path) if cache_path else gguf_tokenizer_cache_path(path)
    if cache and cache_path.is_file():
      return cls.from_file(cache_path)
    if not path.is_file():
      raise FileNotFoundError(f"GGUF file {str(path)!r} not found.")
    from gguf import GGUFReader  # pylint: disable=import-outside-toplevel
    proto = proto_from_gguf(GGUFReader(path))
    if cache:
      write_atomic(cache_path, proto)
    return cls(proto)

  @property
  def model_proto(self) -> bytes:
    """The serialised ModelProto (write it to get a `.model` file)."""
    return self._proto

  def save(self, path: str | os.PathLike) -> None:
    """Writes the `.model` file."""
    write_atomic(Path(path), self._proto)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (no BOS unless asked)."""
    ids = list(self._sp.encode(text))
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def encode_batch(self, texts: Sequence[str], *, num_threads: int = -1) -> list[list[int]]:
    """Token ids of several texts (SentencePiece threads over them)."""
    return [list(ids) for ids in self._sp.encode(list(texts), num_threads=num_threads)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; control tokens (BOS/EOS/pad) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    """The vocabulary piece of one id."""
    return self._sp.id_to_piece(int(i))

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id},"
            f" eos={self.eos_id}, pad={self.pad_id}, unk={self.unk_id})")


def _field(reader: Any, key: str, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def proto_from_gguf(reader: Any) -> bytes:
  """A serialised SentencePiece BPE ModelProto from an open `gguf.GGUFReader`."""
  from sentencepiece import sentencepiece_model_pb2 as spb  # pylint: disable=import-outside-toplevel
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if not tokens:
    raise ValueError(
        "GGUF file has no tokenizer.ggml.tokens vocabulary; load a .model file"
        " with Tokenizer.from_file instead.")
  model = _field(reader, "tokenizer.ggml.model", "llama")
  if model != "llama":
    raise ValueError(
        f"GGUF tokenizer.ggml.model is {model!r}; only SentencePiece ('llama')"
        f" vocabularies, as in Gemma, can be rebuilt.")
  scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", 3))
  # llama.cpp's GGUF token_type codes, by SentencePiece piece-type name.
  piece_types = dict(enumerate(("NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"),
                               start=1))
  proto = spb.ModelProto()
  for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
    name = "UNKNOWN" if i == unk_id else piece_types.get(int(kind), "NORMAL")
    proto.pieces.add(piece=text, score=float(score),
                     type=spb.ModelProto.SentencePiece.Type.Value(name))
  spec = proto.trainer_spec
  spec.model_type = spb.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = True
  # SentencePiece resolves special ids through the *piece* names (defaults
  # "<s>", "</s>"), so set both the ids and the pieces.
  special = {
      "unk": unk_id,
      "bos": int(_field(reader, "tokenizer.ggml.bos_token_id", BOS_ID)),
      "eos": int(_field(reader, "tokenizer.ggml.eos_token_id", EOS_ID)),
      "pad": int(_field(reader, "tokenizer.ggml.padding_token_id", PAD_ID)),
  }
  for name, i in special.items():
    setattr(spec, f"{name}_id", i)
    setattr(spec, f"{name}_piece", tokens[i])
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
  norm.escape_whitespaces = True
  norm.remove_extra_whitespaces = False
  return proto.SerializeToString()


def gguf_tokenizer_cache_path(gguf_path: str | os.PathLike) -> Path:
  """Where the rebuilt `.model` of a GGUF file is cached (beside the file)."""
  p = Path(gguf_path)
  return p.with_name(p.stem + ".tokenizer.model")


def write_atomic(path: Path, data: bytes) -> None:
  """Writes via a temporary file so a crash never leaves a truncated cache."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except OSError as e:  # a read-only cache dir only costs speed
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.warn(f"could not write tokenizer cache {str(path)!r}: {e}")
