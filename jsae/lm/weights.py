"""Gemma weights from GGUF, Hugging Face safetensors and the official JAX layout.

Every loader returns `(params, config)`: the params tree of `jsae.lm.gemma`
(see `gemma.param_shapes`) as jax arrays, and the matching `GemmaConfig`.
Shapes are checked against the config; a mismatch names the tensor, the
expected and the found shape.

Our tree (d = d_model, H = n_heads, K = n_kv_heads, h = head_dim, f = d_ff;
norm weights zero-centred, i.e. the model multiplies by 1 + w):

| ours (layers[i].*) | GGUF `blk.{i}.*.weight` | HF `model.layers.{i}.*.weight` | gemma library `layer_{i}/...` |
|---|---|---|---|
| attn_norm [d]      | attn_norm (1 + w)       | input_layernorm (w)            | pre_attention_norm/scale (w) |
| q [d, H, h]        | attn_q (H*h, d)         | self_attn.q_proj (H*h, d)      | attn/q_einsum/w [H, d, h] |
| k, v [d, K, h]     | attn_k, attn_v (K*h, d) | self_attn.{k,v}_proj (K*h, d)  | attn/kv_einsum/w [2, K, d, h] |
|                    |                         |                                | (attn/qkv_einsum/w [3, H, d, h] when K == H) |
| o [H, h, d]        | attn_output (d, H*h)    | self_attn.o_proj (d, H*h)      | attn/attn_vec_einsum/w [H, h, d] |
| q_norm, k_norm [h] | attn_{q,k}_norm (1 + w) | self_attn.{q,k}_norm (w)       | attn/_query_norm/scale, attn/_key_norm/scale |
| post_attn_norm [d] | post_attention_norm     | post_attention_layernorm       | post_attention_norm/scale |
| mlp_norm [d]       | ffn_norm                | pre_feedforward_layernorm      | pre_ffw_norm/scale |
| gate, up [d, f]    | ffn_gate, ffn_up (f, d) | mlp.{gate,up}_proj (f, d)      | mlp/gating_einsum [2, f, d] (Gemma 3) or [2, d, f] (Gemma 2) |
| down [f, d]        | ffn_down (d, f)         | mlp.down_proj (d, f)           | mlp/linear [f, d] |
| post_mlp_norm [d]  | post_ffw_norm           | post_feedforward_layernorm     | post_ffw_norm/scale |
| embed [V, d]       | token_embd              | model.embed_tokens             | embedder/input_embedding |
| final_norm [d]     | output_norm (1 + w)     | model.norm (w)                 | final_norm/scale (w) |

GGUF and HF matrices are (out_features, in_features), so y = x @ W.T; neither
permutes q/k (both use rotate-half RoPE). GGUF stores Gemma norm weights as
1 + w, HF and the gemma library store w. HF multimodal Gemma 3 checkpoints
prefix names with `language_model.` / `model.language_model.`, which is
detected. The gemma library tree may be wrapped in `transformer/` or
`params/`; vision-encoder and `mm_*` entries are ignored.

GGUF files from llama.cpp hold quantised weights; `gguf.quants.dequantize`
turns them into float32 (not bit-identical to the bf16 release, but a real LM).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jsae.lm import gemma
from jsae.lm import mesh as lm_mesh
from jsae.lm.gemma import GemmaConfig

__all__ = [
    "load_gguf", "read_gguf", "config_from_gguf", "params_from_gguf", "params_to_gguf",
    "load_hf", "config_from_hf", "params_from_hf", "params_to_hf",
    "load_orbax", "params_from_gemma_tree", "params_to_gemma_tree",
    "save_params", "load_params", "to_device",
]

NpParams = dict[str, Any]

# ours -> (GGUF name, HF name, kind). `kind` says how the matrix is laid out.
_LAYER_NAMES = {
    "attn_norm": ("attn_norm", "input_layernorm", "norm"),
    "q": ("attn_q", "self_attn.q_proj", "heads_in"),
    "k": ("attn_k", "self_attn.k_proj", "heads_in"),
    "v": ("attn_v", "self_attn.v_proj", "heads_in"),
    "o": ("attn_output", "self_attn.o_proj", "heads_out"),
    "q_norm": ("attn_q_norm", "self_attn.q_norm", "norm"),
    "k_norm": ("attn_k_norm", "self_attn.k_norm", "norm"),
    "post_attn_norm": ("post_attention_norm", "post_attention_layernorm", "norm"),
    "mlp_norm": ("ffn_norm", "pre_feedforward_layernorm", "norm"),
    "gate": ("ffn_gate", "mlp.gate_proj", "linear"),
    "up": ("ffn_up", "mlp.up_proj", "linear"),
    "down": ("ffn_down", "mlp.down_proj", "linear"),
    "post_mlp_norm": ("post_ffw_norm", "post_feedforward_layernorm", "norm"),
}


# ------------------------------------------------------------ (out, in) layouts

def _out_in_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the (out, in) source tensor for one of our tensors."""
  if kind == "heads_in":  # [d, n, h] <- (n*h, d)
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_out":  # [H, h, d] <- (d, H*h)
    return (shape[2], shape[0] * shape[1])
  if kind == "linear":
    return shape[::-1]
  return shape


def _from_out_in(kind: str, w: np.ndarray, shape: tuple[int, ...], norm_offset: float):
  if kind == "heads_in":
    d, n, h = shape
    return w.reshape(n, h, d).transpose(2, 0, 1)
  if kind == "heads_out":
    return w.T.reshape(shape)
  if kind == "linear":
    return w.T
  return w - norm_offset if kind == "norm" else w


def _to_out_in(kind: str, a: np.ndarray, norm_offset: float) -> np.ndarray:
  if kind == "heads_in":
    d, n, h = a.shape
    return a.transpose(1, 2, 0).reshape(n * h, d)
  if kind == "heads_out":
    H, h, d = a.shape
    return a.reshape(H * h, d).T
  if kind == "linear":
    return a.T
  return a + norm_offset if kind == "norm" else a


def _check_shape(fmt: str, name: str, found, expected, config: GemmaConfig) -> None:
  if tuple(found) != tuple(expected):
    raise ValueError(
        f"{fmt} tensor {name!r} has shape {tuple(found)}, expected {tuple(expected)}"
        f" for config {config.name!r}; is this checkpoint for a different model?")


def _params_from_out_in(fmt: str, get: Callable[[str], np.ndarray | None],
                        names: Callable[[int | None, str], str], config: GemmaConfig,
                        norm_offset: float) -> NpParams:
  """Shared GGUF/HF conversion: `get(name)` returns a tensor or None."""
  expected = gemma.param_shapes(config)

  def fetch(name: str, kind: str, shape) -> np.ndarray:
    w = get(name)
    if w is None:
      raise ValueError(
          f"{fmt} checkpoint has no tensor {name!r} (needed for config"
          f" {config.name!r}); is it a Gemma {config.family} checkpoint?")
    _check_shape(fmt, name, w.shape, _out_in_shape(kind, shape), config)
    return np.asarray(_from_out_in(kind, np.asarray(w, np.float32), shape, norm_offset))

  params = {
      "embed": fetch(names(None, "embed"), "embed", expected["embed"]),
      "final_norm": fetch(names(None, "final_norm"), "norm", expected["final_norm"]),
      "layers": [],
  }
  for i, layer in enumerate(expected["layers"]):
    params["layers"].append({
        key: fetch(names(i, key), _LAYER_NAMES[key][2], shape) for key, shape in layer.items()})
  return params


def _params_to_out_in(params, config: GemmaConfig, names, norm_offset: float) -> dict:
  out = {
      names(None, "embed"): np.asarray(params["embed"], np.float32),
      names(None, "final_norm"): np.asarray(params["final_norm"], np.float32) + norm_offset,
  }
  for i, lp in enumerate(params["layers"]):
    for key, a in lp.items():
      out[names(i, key)] = np.ascontiguousarray(
          _to_out_in(_LAYER_NAMES[key][2], np.asarray(a, np.float32), norm_offset))
  return out


# ------------------------------------------------------------------------ GGUF

def _gguf_name(layer: int | None, key: str) -> str:
  if layer is None:
    return {"embed": "token_embd.weight", "final_norm": "output_norm.weight"}[key]
  return f"blk.{layer}.{_LAYER_NAMES[key][0]}.weight"


def _open_gguf(path: str | os.PathLike):
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {str(path)!r} not found.")
  try:
    from gguf import GGUFReader  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading GGUF needs the gguf package: pip install 'jsae[models]'.") from e
  try:
    return GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueErrors/struct errors
    raise ValueError(f"could not read {str(path)!r} as GGUF ({e}); is the file complete?") from e


_BIG_GGUF_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def read_gguf_raw(path) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
  """(GGUF reader, dequantised float32 tensors, metadata) of a GGUF file."""
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel
  reader = _open_gguf(path)
  metadata = {k: f.contents() for k, f in reader.fields.items() if k not in _BIG_GGUF_FIELDS}
  tensors = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
             for t in reader.tensors}
  return reader, tensors, metadata


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Dequantised float32 tensors ((out, in) numpy) and metadata (no vocabulary)."""
  _, tensors, metadata = read_gguf_raw(path)
  return tensors, metadata


def _f32_decimal(x) -> float:
  """GGUF stores float32: 1e-6 reads back as 9.99999997e-07; undo that."""
  return float(f"{float(x):.7g}")


def config_from_gguf(metadata: Mapping[str, Any], vocab_size: int) -> GemmaConfig:
  """A GemmaConfig from GGUF metadata (`gemma2.*` or `gemma3.*` keys)."""
  arch = metadata.get("general.architecture")
  if arch not in ("gemma2", "gemma3"):
    raise ValueError(
        f"GGUF general.architecture is {arch!r}; only 'gemma2' and 'gemma3' are"
        f" supported.")

  def get(key, default=None):
    v = metadata.get(f"{arch}.{key}", default)
    if v is None:
      raise ValueError(f"GGUF metadata lacks {arch}.{key}.")
    return v

  d, n_layers, n_heads = int(get("embedding_length")), int(get("block_count")), int(
      get("attention.head_count"))
  head_dim = int(get("attention.key_length", d // n_heads))
  # llama.cpp's rule: the 27B models scale queries by (d / H)^-1/2, others by head_dim^-1/2.
  is_27b = (arch, n_layers) in (("gemma2", 46), ("gemma3", 62))
  query_scale = (d / n_heads if is_27b else head_dim) ** -0.5
  if arch == "gemma2":
    types = gemma._pattern(n_layers, 2)  # pylint: disable=protected-access
    rope_local = rope_global = float(get("rope.freq_base", 10_000.0))
    caps = (float(get("attn_logit_softcapping", 50.0)),
            float(get("final_logit_softcapping", 30.0)))
  else:
    every = int(metadata.get(f"{arch}.attention.sliding_window_pattern", 6) or 6)
    types = gemma._pattern(n_layers, every)  # pylint: disable=protected-access
    rope_local, rope_global = 10_000.0, float(get("rope.freq_base", 1_000_000.0))
    caps = (None, None)
  return GemmaConfig(
      name=str(metadata.get("general.name", arch)), family=arch,
      vocab_size=int(vocab_size), d_model=d, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
      d_ff=int(get("feed_forward_length")), attention_types=types,
      sliding_window=int(get("attention.sliding_window", 4096)),
      rope_base_local=rope_local, rope_base_global=rope_global,
      rope_scale_global=float(metadata.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0),
      query_scale=query_scale, attn_logit_softcap=caps[0], final_logit_softcap=caps[1],
      qk_norm=arch == "gemma3", rms_eps=_f32_decimal(get("attention.layer_norm_rms_epsilon", 1e-6)),
      max_seq_len=int(get("context_length", 8192)))


def params_from_gguf(tensors: Mapping[str, np.ndarray], config: GemmaConfig) -> NpParams:
  """Our numpy params tree from dequantised GGUF tensors (norms: 1 + w -> w)."""
  return _params_from_out_in("GGUF", tensors.get, _gguf_name, config, norm_offset=1.0)


def params_to_gguf(params, config: GemmaConfig) -> dict[str, np.ndarray]:
  """Inverse of `params_from_gguf`: GGUF-named float32 (out, in) tensors."""
  return _params_to_out_in(params, config, _gguf_name, norm_offset=1.0)


def load_gguf(path: str | os.PathLike, *, dtype=jnp.float32, mesh=None
              ) -> tuple[gemma.Params, GemmaConfig]:
  """Params and config of a Gemma 2/3 GGUF file (~20 s for Gemma 3 270M); `mesh`: see
  `to_device`."""
  _, tensors, metadata = read_gguf_raw(path)
  return gguf_to_params(tensors, metadata, dtype, mesh=mesh)


def gguf_config(tensors, metadata) -> GemmaConfig:
  """The GemmaConfig of a GGUF's header and tensors (the vocabulary from the embedding)."""
  if "token_embd.weight" not in tensors:
    raise ValueError("GGUF file has no token_embd.weight; is it a Gemma model?")
  return config_from_gguf(metadata, tensors["token_embd.weight"].shape[0])


def gguf_to_params(tensors, metadata, dtype, *, mesh=None):
  """(params in `dtype`, GemmaConfig) from dequantised GGUF tensors and metadata."""
  config = gguf_config(tensors, metadata)
  return to_device(params_from_gguf(tensors, config), dtype, mesh=mesh), config


# -------------------------------------------------------------- Hugging Face

# Defaults of the Hugging Face config classes: config.json files (notably the
# `text_config` of multimodal Gemma 3) list only the fields that differ.
_HF_DEFAULTS = {
    "gemma2": dict(
        vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000.0,
        query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=8192),
    "gemma3": dict(
        vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
        sliding_window=4096, sliding_window_pattern=6,
        attn_logit_softcapping=None, final_logit_softcapping=None,
        max_position_embeddings=131_072),
}


def config_from_hf(hf: Mapping[str, Any]) -> GemmaConfig:
  """A GemmaConfig from a Hugging Face `config.json` dict (Gemma 2 or 3)."""
  top = dict(hf)
  text_cfg = dict(top.get("text_config") or top)
  model_type = str(text_cfg.get("model_type") or top.get("model_type") or "")
  if model_type.startswith("gemma2"):
    family = "gemma2"
  elif model_type.startswith("gemma3"):
    family = "gemma3"
  else:
    raise ValueError(
        f"config.json model_type is {model_type!r}; expected gemma2 or gemma3"
        f" (gemma3_text).")
  hf = {**_HF_DEFAULTS[family], **{k: v for k, v in text_cfg.items() if v is not None
                                   or k.endswith("softcapping")}}
  n_layers = int(hf["num_hidden_layers"])
  if hf.get("layer_types"):
    types = tuple(gemma.LOCAL if t == "sliding_attention" else gemma.GLOBAL
                  for t in hf["layer_types"])
  elif family == "gemma2":
    types = gemma._pattern(n_layers, 2)  # pylint: disable=protected-access
  else:
    types = gemma._pattern(n_layers, int(hf["sliding_window_pattern"]))  # pylint: disable=protected-access
  scaling = hf.get("rope_scaling") or {}
  rope_global = float(hf["rope_theta"])
  return GemmaConfig(
      name=str(top.get("_name_or_path") or model_type), family=family,
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      n_layers=n_layers, n_heads=int(hf["num_attention_heads"]),
      n_kv_heads=int(hf["num_key_value_heads"]), head_dim=int(hf["head_dim"]),
      d_ff=int(hf["intermediate_size"]), attention_types=types,
      sliding_window=int(hf["sliding_window"]),
      rope_base_local=float(hf.get("rope_local_base_freq", rope_global)),
      rope_base_global=rope_global,
      rope_scale_global=float(scaling.get("factor", 1.0)),
      query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      qk_norm=family == "gemma3", rms_eps=float(hf["rms_norm_eps"]),
      max_seq_len=int(hf["max_position_embeddings"]))


def _hf_names(prefix: str):
  def names(layer: int | None, key: str) -> str:
    if layer is None:
      return prefix + {"embed": "embed_tokens.weight", "final_norm": "norm.weight"}[key]
    return f"{prefix}layers.{layer}.{_LAYER_NAMES[key][1]}.weight"
  return names


def _hf_prefix(keys) -> str:
  """'model.' normally; multimodal Gemma 3 nests the text model deeper."""
  for k in keys:
    if k.endswith("embed_tokens.weight") and "vision" not in k:
      return k[: -len("embed_tokens.weight")]
  raise ValueError(
      "no '*embed_tokens.weight' tensor in the safetensors files; is this a"
      " Hugging Face Gemma checkpoint?")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: GemmaConfig) -> NpParams:
  """Our numpy params tree from HF-named tensors (any Mapping, read lazily)."""
  names = _hf_names(_hf_prefix(tensors.keys()))
  get = lambda name: tensors[name] if name in tensors else None  # pylint: disable=unnecessary-lambda-assignment
  return _params_from_out_in("HF", get, names, config, norm_offset=0.0)


def params_to_hf(params, config: GemmaConfig, *, prefix: str = "model.") -> dict[str, np.ndarray]:
  """Inverse of `params_from_hf`: HF-named float32 tensors."""
  return _params_to_out_in(params, config, _hf_names(prefix), norm_offset=0.0)


class _LazySafetensors(Mapping):
  """Tensor name -> numpy array over one or more safetensors files, read on access."""

  def __init__(self, files: list[Path]):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._where: dict[str, Any] = {}
    self._handles = []
    for f in files:
      if not f.is_file():
        raise FileNotFoundError(f"safetensors file {str(f)!r} not found.")
      try:
        h = safe_open(str(f), framework="numpy")
      except Exception as e:
        raise ValueError(f"could not read {str(f)!r} as safetensors ({e}).") from e
      self._handles.append(h)
      for k in h.keys():
        self._where[k] = h

  def __getitem__(self, key):
    return self._where[key].get_tensor(key)

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def _hf_files(path: Path) -> list[Path]:
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise FileNotFoundError(
        f"Hugging Face checkpoint {str(path)!r} not found; pass a directory with"
        f" model.safetensors (or model.safetensors.index.json) or a .safetensors file.")
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return [path / f for f in sorted(set(weight_map.values()))]
  single = path / "model.safetensors"
  if single.is_file():
    return [single]
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {str(path)!r}.")
  return files


def load_hf(path: str | os.PathLike, config: GemmaConfig | str | None = None, *,
            dtype=jnp.float32, mesh=None) -> tuple[gemma.Params, GemmaConfig]:
  """Params from a Hugging Face Gemma 2/3 checkpoint (directory or file).

  Args:
    path: a directory with `model.safetensors` or sharded files listed in
      `model.safetensors.index.json`, or a single `.safetensors` file.
    config: a GemmaConfig or registry name; default: from `config.json` in
      the directory.
    dtype: dtype of the returned weight matrices (norms stay float32).
    mesh: an LM mesh (`jsae.lm.mesh`) to read the tensors into, a slice per device.
  """
  path = Path(path)
  files = _hf_files(path)
  if config is None:
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.is_file():
      raise FileNotFoundError(
          f"no config.json beside {str(path)!r}; pass config= (a GemmaConfig or a"
          f" name from jsae.lm.gemma.list_configs()).")
    config = config_from_hf(json.loads(cfg_file.read_text()))
  config = gemma.get_config(config)
  return to_device(params_from_hf(_LazySafetensors(files), config), dtype, mesh=mesh), config


# ----------------------------------------------------- gemma library / Orbax

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def _strip_wrappers(flat: dict[str, Any]) -> dict[str, Any]:
  """Drops leading 'params/' / 'transformer/' and vision entries."""
  out = {}
  for k, v in flat.items():
    parts = k.split("/")
    while parts and parts[0] in ("params", "transformer"):
      parts = parts[1:]
    k = "/".join(parts)
    if k.startswith("vision_encoder") or "/mm_" in k:
      continue
    out[k] = v
  return out


def params_from_gemma_tree(tree: Mapping[str, Any], config: GemmaConfig) -> NpParams:
  """Our numpy params tree from the gemma library's param tree (nested dict)."""
  c = config
  flat = _strip_wrappers(_flatten(tree))

  def get(*names: str) -> tuple[str, np.ndarray]:
    for n in names:
      if n in flat:  # arrays restored onto a mesh stay there (`load_orbax(mesh=)`)
        a = flat[n]
        return n, a if isinstance(a, jax.Array) else np.asarray(a, np.float32)
    sample = ", ".join(sorted(flat)[:6])
    raise ValueError(
        f"gemma-layout checkpoint has no {' or '.join(repr(n) for n in names)};"
        f" found e.g. {sample}. Is it a Gemma {c.family} checkpoint?")

  def checked(name, a, shape):
    _check_shape("gemma-layout", name, a.shape, shape, c)
    return a

  d, f, H, K, h = c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim
  params = {
      "embed": checked(*get("embedder/input_embedding"), (c.vocab_size, d)),
      "final_norm": checked(*get("final_norm/scale"), (d,)),
      "layers": [],
  }
  for i in range(c.n_layers):
    p = f"layer_{i}/"
    lp = {"attn_norm": checked(*get(p + "pre_attention_norm/scale"), (d,))}
    if p + "attn/qkv_einsum/w" in flat:
      qkv = checked(*get(p + "attn/qkv_einsum/w"), (3, H, d, h))
      lp["q"], lp["k"], lp["v"] = (qkv[j].transpose(1, 0, 2) for j in range(3))
    else:
      lp["q"] = checked(*get(p + "attn/q_einsum/w"), (H, d, h)).transpose(1, 0, 2)
      kv = checked(*get(p + "attn/kv_einsum/w"), (2, K, d, h))
      lp["k"], lp["v"] = kv[0].transpose(1, 0, 2), kv[1].transpose(1, 0, 2)
    lp["o"] = checked(*get(p + "attn/attn_vec_einsum/w"), (H, h, d))
    if c.qk_norm:
      lp["q_norm"] = checked(*get(p + "attn/_query_norm/scale"), (h,))
      lp["k_norm"] = checked(*get(p + "attn/_key_norm/scale"), (h,))
    lp["post_attn_norm"] = checked(*get(p + "post_attention_norm/scale"), (d,))
    lp["mlp_norm"] = checked(*get(p + "pre_ffw_norm/scale"), (d,))
    name, gating = get(p + "mlp/gating_einsum", p + "mlp/gating_einsum/w")
    if gating.shape == (2, f, d) and d != f:  # Gemma 3 ("transposed") order
      lp["gate"], lp["up"] = gating[0].T, gating[1].T
    else:  # Gemma 2 order [2, d, f]
      checked(name, gating, (2, d, f))
      lp["gate"], lp["up"] = gating[0], gating[1]
    lp["down"] = checked(*get(p + "mlp/linear", p + "mlp/linear/w"), (f, d))
    lp["post_mlp_norm"] = checked(*get(p + "post_ffw_norm/scale"), (d,))
    params["layers"].append({k: v if isinstance(v, jax.Array) else np.ascontiguousarray(v)
                             for k, v in lp.items()})
  return params


def params_to_gemma_tree(params, config: GemmaConfig, *,
                         transpose_gating: bool | None = None) -> dict[str, Any]:
  """Inverse of `params_from_gemma_tree`: the gemma library's nested param dict.

  `transpose_gating` picks the [2, f, d] gating layout (Gemma 3 checkpoints;
  the default for family gemma3) over [2, d, f] (Gemma 2).
  """
  c = config
  if transpose_gating is None:
    transpose_gating = c.family == "gemma3"
  a = lambda x: np.asarray(x, np.float32)  # pylint: disable=unnecessary-lambda-assignment
  tree: dict[str, Any] = {
      "embedder": {"input_embedding": a(params["embed"])},
      "final_norm": {"scale": a(params["final_norm"])},
  }
  for i, lp in enumerate(params["layers"]):
    q, k, v = (a(lp[n]).transpose(1, 0, 2) for n in ("q", "k", "v"))
    attn: dict[str, Any] = {"attn_vec_einsum": {"w": a(lp["o"])}}
    if c.n_kv_heads == c.n_heads:
      attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
    else:
      attn["q_einsum"] = {"w": q}
      attn["kv_einsum"] = {"w": np.stack([k, v])}
    if c.qk_norm:
      attn["_query_norm"] = {"scale": a(lp["q_norm"])}
      attn["_key_norm"] = {"scale": a(lp["k_norm"])}
    gate, up = a(lp["gate"]), a(lp["up"])
    gating = np.stack([gate.T, up.T]) if transpose_gating else np.stack([gate, up])
    tree[f"layer_{i}"] = {
        "pre_attention_norm": {"scale": a(lp["attn_norm"])},
        "attn": attn,
        "post_attention_norm": {"scale": a(lp["post_attn_norm"])},
        "pre_ffw_norm": {"scale": a(lp["mlp_norm"])},
        "mlp": {"gating_einsum": gating, "linear": a(lp["down"])},
        "post_ffw_norm": {"scale": a(lp["post_mlp_norm"])},
    }
  return tree


# Where each gemma-layout tensor's split dimension lies (for `load_orbax(mesh=)`), by the
# end of its name: q_einsum [H, d, h], qkv_einsum [3, H, d, h], kv_einsum [2, K, d, h],
# attn_vec_einsum [H, h, d], gating_einsum [2, f, d] (Gemma 3) or [2, d, f] (Gemma 2),
# linear [f, d], input_embedding [vocab, d]; anything else (norms) stays whole.
_GEMMA_SPLIT_AXIS = (("embedder/input_embedding", "vocab", 0), ("attn/q_einsum/w", "heads", 0),
                     ("attn/qkv_einsum/w", "heads", 1), ("attn/kv_einsum/w", "kv_heads", 1),
                     ("attn/attn_vec_einsum/w", "heads", 0), ("mlp/linear", "ff", 0),
                     ("mlp/linear/w", "ff", 0))


def _gemma_source_spec(name: str, shape: tuple[int, ...], config: GemmaConfig, model: int):
  """The PartitionSpec a gemma-layout tensor is restored with, so that our layout of it
  (`params_from_gemma_tree`: transposes and slices) is `jsae.lm.mesh`'s without moving data."""
  P = jax.sharding.PartitionSpec
  sizes = dict(vocab=config.vocab_size, heads=config.n_heads, kv_heads=config.n_kv_heads,
               ff=config.d_ff)
  axis = None
  for suffix, dim, where in _GEMMA_SPLIT_AXIS:
    if name.endswith(suffix) and sizes[dim] % model == 0:
      axis = where
  if name.endswith(("mlp/gating_einsum", "mlp/gating_einsum/w")) and config.d_ff % model == 0:
    axis = 1 if tuple(shape) == (2, config.d_ff, config.d_model) else 2
  if axis is None or model == 1 or len(shape) <= axis:
    return P()
  return P(*("model" if i == axis else None for i in range(len(shape))))


def _restore_orbax(path: Path, config: GemmaConfig | None = None, mesh=None
                   ) -> Mapping[str, Any]:
  if not path.exists():
    raise FileNotFoundError(f"Orbax checkpoint {str(path)!r} not found.")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckptr = ocp.PyTreeCheckpointer()
  try:
    try:
      meta = ckptr.metadata(path)
      tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
      if mesh is None:  # host numpy arrays, whatever sharding it was saved with
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      else:  # each device reads its slice of each tensor from the checkpoint itself
        def arg(key_path, leaf):
          name = "/".join(str(getattr(k, "key", k)) for k in key_path)
          spec = _gemma_source_spec(name, tuple(leaf.shape), config, mesh.shape["model"])
          return ocp.ArrayRestoreArgs(sharding=jax.sharding.NamedSharding(mesh, spec))
        args = jax.tree_util.tree_map_with_path(arg, tree)
      return ckptr.restore(path, restore_args=args)
    except (AttributeError, TypeError):
      if mesh is not None:
        raise
      return ckptr.restore(path)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f"could not restore {str(path)!r} as an Orbax checkpoint ({e}).") from e


def load_orbax(path_or_tree: str | os.PathLike | Mapping[str, Any],
               config: GemmaConfig | str, *, dtype=jnp.float32, mesh=None
               ) -> tuple[gemma.Params, GemmaConfig]:
  """Params from a checkpoint of Google's `gemma` library (path or restored dict).

  A path is restored with Orbax (`PyTreeCheckpointer`, arrays as numpy); a
  dict is converted directly. `config` is a GemmaConfig or registry name (the
  layout carries no hyperparameters). Official Gemma 2 checkpoints pad the
  vocabulary to 256128 rows: pass `dataclasses.replace(config, vocab_size=256128)`.
  With `mesh` a path is restored by Orbax with each tensor's sharding on the mesh (each
  device reads its own slice, in the layout whose transposes give `jsae.lm.mesh`'s), and
  the conversion runs on the devices; a dict goes to its shardings from the host.
  """
  config = gemma.get_config(config)
  if isinstance(path_or_tree, Mapping):
    tree = path_or_tree
  else:
    tree = _restore_orbax(Path(path_or_tree), config, mesh)
  return to_device(params_from_gemma_tree(tree, config), dtype, mesh=mesh), config


# ------------------------------------------------------- own format and cache

_FORMAT = "jsae-gemma-params-v1"


def _flat_names(params) -> dict[str, Any]:
  out = {"embed": params["embed"], "final_norm": params["final_norm"]}
  for i, lp in enumerate(params["layers"]):
    out.update({f"layers.{i}.{k}": v for k, v in lp.items()})
  return out


def save_params(path: str | os.PathLike, params, config: GemmaConfig,
                extra_metadata: Mapping[str, str] | None = None) -> None:
  """Writes params (float32) + config to one safetensors file, atomically."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32))
             for k, v in _flat_names(params).items()}
  meta = {"format": _FORMAT, "config": config.to_json(), **dict(extra_metadata or {})}
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  save_file(tensors, str(tmp), metadata=meta)
  os.replace(tmp, path)


def read_params_file(path: Path) -> tuple[NpParams, GemmaConfig, dict[str, str]]:
  """(numpy params, config, file metadata) of a file written by `save_params`."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  if not path.is_file():
    raise FileNotFoundError(f"params file {str(path)!r} not found.")
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = dict(f.metadata() or {})
      if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a jsae params file (format"
            f" {meta.get('format')!r}); for Hugging Face checkpoints use load_hf.")
      config = GemmaConfig.from_dict(json.loads(meta["config"]))
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except ValueError:
    raise
  except Exception as e:
    raise ValueError(f"could not read params file {str(path)!r} ({e}).") from e
  params = {"embed": flat.pop("embed"), "final_norm": flat.pop("final_norm"),
            "layers": [{} for _ in range(config.n_layers)]}
  for k, v in flat.items():
    _, i, name = k.split(".", 2)
    params["layers"][int(i)][name] = v
  return params, config, meta


def load_params(path: str | os.PathLike, *, dtype=jnp.float32, mesh=None
                ) -> tuple[gemma.Params, GemmaConfig]:
  """Reads a file written by `save_params`; `mesh`: see `to_device`."""
  params, config, _ = read_params_file(Path(path))
  return to_device(params, dtype, config, mesh=mesh), config


def to_device(params: NpParams, dtype=jnp.float32, config: GemmaConfig | None = None, *,
              mesh=None) -> gemma.Params:
  """jax arrays (matrices in `dtype`, norms float32), shape-checked if given a config.

  With `mesh` (`jsae.lm.mesh.make_mesh`) each tensor goes straight to its sharding
  (`jsae.lm.mesh.place`): each device receives its slice of the host copy, never the
  whole tensor.
  """
  if config is not None:
    gemma.check_params(params, config)
  if mesh is not None:
    return lm_mesh.place(params, mesh, dtype)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32 if a.ndim == 1 else dtype), params)


def rename(config: GemmaConfig, name: str) -> GemmaConfig:
  """`config` under another registry name."""
  return dataclasses.replace(config, name=name)
