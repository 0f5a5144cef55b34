"""A tiny Gemma 2 GGUF file with a SentencePiece vocabulary: a real LM checkpoint
(file, tokenizer, loader path) for tests of the pipeline, in a few kilobytes."""

import dataclasses

import jax
import numpy as np

from jsae.lm import gemma, weights


def write_gguf(path, cfg, tensors):
  """Writes `tensors` (GGUF names) and a 300-piece tokenizer for `cfg` to `path`."""
  import gguf
  w = gguf.GGUFWriter(str(path), cfg.family)
  w.add_block_count(cfg.n_layers)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_sliding_window(cfg.sliding_window)
  w.add_context_length(cfg.max_seq_len)
  w.add_rope_freq_base(cfg.rope_base_global)
  if cfg.attn_logit_softcap:
    w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
    w.add_final_logit_softcapping(cfg.final_logit_softcap)
  # A tiny SentencePiece vocabulary: specials, bytes, a few merges.
  pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
  pieces += ["\u2581", "h", "i", "hi", "\u2581hi"]
  pieces += [f"<unused{j}>" for j in range(cfg.vocab_size - len(pieces))]
  types = [3, 3, 3, 2] + [6] * 256 + [1] * 5 + [5] * (cfg.vocab_size - 265)
  scores = [0.0] * 260 + [-1.0, -2.0, -3.0, -0.5, -0.1] + [0.0] * (cfg.vocab_size - 265)
  w.add_tokenizer_model("llama")
  w.add_token_list(pieces)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  for name, a in tensors.items():
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()



def make_tiny_gguf(path, seed: int = 2):
  """tiny_gemma2 (d_model 64, 4 layers) with vocabulary 300, random weights, at `path`."""
  cfg = dataclasses.replace(gemma.get_config("tiny_gemma2"), vocab_size=300)
  params = jax.tree.map(np.asarray, gemma.init_params(jax.random.key(seed), cfg))
  write_gguf(path, cfg, weights.params_to_gguf(params, cfg))
  return path


def write_corpus(directory, words, *, n_docs: int, words_per_doc: int, seed: int = 0):
  """`n_docs` .txt files of random `words` in `directory` (a local text source)."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n_docs):
    (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(words, words_per_doc)))
  return directory
