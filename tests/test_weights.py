"""Weight mappings (GGUF, HF safetensors, gemma-library layout): semantics and round trips."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jsae.lm import gemma, weights

import tiny_gguf


@pytest.fixture(scope="module", params=["tiny_gemma2", "tiny_gemma3"])
def model(request):
  cfg = gemma.get_config(request.param)
  params = jax.tree.map(np.asarray, gemma.init_params(jax.random.key(1), cfg))
  return cfg, params


def _assert_tree_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def _x(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------- HF / GGUF layouts

def _check_out_in_semantics(named, cfg, lp, layer, names, norm_offset):
  """Each (out, in) tensor computes what our tensor computes: y = x @ W.T."""
  H, K, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
  x = _x(3, d)
  q = x @ named[names["q"]].T  # [3, H*h], heads contiguous
  np.testing.assert_allclose(q.reshape(3, H, h), np.einsum("td,dnh->tnh", x, lp["q"]), atol=1e-5)
  for key in ("k", "v"):
    out = (x @ named[names[key]].T).reshape(3, K, h)
    np.testing.assert_allclose(out, np.einsum("td,dkh->tkh", x, lp[key]), atol=1e-5)
  z = _x(3, H * h, seed=1)
  np.testing.assert_allclose(z @ named[names["o"]].T,
                             np.einsum("tnh,nhd->td", z.reshape(3, H, h), lp["o"]), atol=1e-5)
  for key in ("gate", "up"):
    np.testing.assert_allclose(x @ named[names[key]].T, x @ lp[key], atol=1e-5)
  f = _x(3, cfg.d_ff, seed=2)
  np.testing.assert_allclose(f @ named[names["down"]].T, f @ lp["down"], atol=1e-5)
  np.testing.assert_allclose(named[names["mlp_norm"]], lp["mlp_norm"] + norm_offset, atol=1e-6)
  if cfg.qk_norm:
    np.testing.assert_allclose(named[names["k_norm"]], lp["k_norm"] + norm_offset, atol=1e-6)


def test_hf_mapping(model):
  cfg, params = model
  hf = weights.params_to_hf(params, cfg)
  i = 1
  names = {k: f"model.layers.{i}.{n}.weight" for k, n in {
      "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
      "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
      "down": "mlp.down_proj", "mlp_norm": "pre_feedforward_layernorm",
      "k_norm": "self_attn.k_norm"}.items()}
  # HF stores norm weights as w (the model multiplies by 1 + w), like us.
  _check_out_in_semantics(hf, cfg, params["layers"][i], i, names, norm_offset=0.0)
  assert hf["model.embed_tokens.weight"].shape == (cfg.vocab_size, cfg.d_model)
  assert ("model.layers.0.self_attn.q_norm.weight" in hf) == cfg.qk_norm
  _assert_tree_equal(weights.params_from_hf(hf, cfg), params)


def test_gguf_mapping(model):
  cfg, params = model
  tensors = weights.params_to_gguf(params, cfg)
  i = 2
  names = {k: f"blk.{i}.{n}.weight" for k, n in {
      "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
      "up": "ffn_up", "down": "ffn_down", "mlp_norm": "ffn_norm", "k_norm": "attn_k_norm"}.items()}
  # GGUF stores Gemma norm weights as 1 + w.
  _check_out_in_semantics(tensors, cfg, params["layers"][i], i, names, norm_offset=1.0)
  np.testing.assert_allclose(tensors["output_norm.weight"], params["final_norm"] + 1, atol=1e-6)
  _assert_tree_equal(weights.params_from_gguf(tensors, cfg), params)


def test_gguf_file_round_trip_and_tokenizer(tmp_path):
  pytest.importorskip("gguf")
  cfg = gemma.get_config("tiny_gemma2")  # 256 vocab leaves no room for the tokenizer
  cfg = dataclasses.replace(cfg, vocab_size=300)
  params = jax.tree.map(np.asarray, gemma.init_params(jax.random.key(2), cfg))
  path = tmp_path / "tiny.gguf"
  tiny_gguf.write_gguf(path, cfg, weights.params_to_gguf(params, cfg))
  loaded, loaded_cfg = weights.load_gguf(path)
  assert dataclasses.replace(loaded_cfg, name=cfg.name) == cfg
  _assert_tree_equal(loaded, params)

  from jsae.lm.tokenizer import Tokenizer, gguf_tokenizer_cache_path
  tok = Tokenizer.from_gguf(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 300)
  assert gguf_tokenizer_cache_path(path).is_file()
  ids = tok.encode(" hi hi!", add_bos=True)
  assert ids == [2, 264, 264, 0x21 + 4]  # '▁hi' twice, then '!' by byte fallback
  assert tok.decode(ids) == " hi hi!"
  assert Tokenizer.from_gguf(path).encode("hi") == [263]  # from the cached .model


def test_gemma_tree_mapping(model):
  cfg, params = model
  tree = weights.params_to_gemma_tree(params, cfg)
  i = 0
  lt, lp = tree[f"layer_{i}"], params["layers"][i]
  H, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model
  x = _x(2, 5, d)
  # The gemma library's own einsum equations, applied to its layout.
  np.testing.assert_allclose(np.einsum("BTD,NDH->BTNH", x, lt["attn"]["q_einsum"]["w"]),
                             np.einsum("btd,dnh->btnh", x, lp["q"]), atol=1e-5)
  k, v = np.einsum("BSD,CKDH->CBSKH", x, lt["attn"]["kv_einsum"]["w"])
  np.testing.assert_allclose(k, np.einsum("btd,dkh->btkh", x, lp["k"]), atol=1e-5)
  np.testing.assert_allclose(v, np.einsum("btd,dkh->btkh", x, lp["v"]), atol=1e-5)
  z = _x(2, 5, H, h, seed=3)
  np.testing.assert_allclose(np.einsum("BTNH,NHD->BTD", z, lt["attn"]["attn_vec_einsum"]["w"]),
                             np.einsum("btnh,nhd->btd", z, lp["o"]), atol=1e-5)
  gating = lt["mlp"]["gating_einsum"]
  if cfg.family == "gemma3":  # transpose_gating_einsum=True
    assert gating.shape == (2, cfg.d_ff, d)
    gate = np.einsum("...F,NHF->...NH", x, gating)
  else:
    assert gating.shape == (2, d, cfg.d_ff)
    gate = np.einsum("...F,NFH->...NH", x, gating)
  np.testing.assert_allclose(gate[..., 0, :], x @ lp["gate"], atol=1e-5)
  np.testing.assert_allclose(gate[..., 1, :], x @ lp["up"], atol=1e-5)
  f = _x(2, 5, cfg.d_ff, seed=4)
  np.testing.assert_allclose(np.einsum("...H,HF->...F", f, lt["mlp"]["linear"]),
                             f @ lp["down"], atol=1e-5)
  # The gemma library also multiplies by (1 + scale): no offset.
  np.testing.assert_array_equal(lt["pre_ffw_norm"]["scale"], lp["mlp_norm"])
  assert ("_query_norm" in lt["attn"]) == cfg.qk_norm
  _assert_tree_equal(weights.params_from_gemma_tree(tree, cfg), params)
  # Wrapped trees (old checkpoints) and the other gating order load too.
  other = weights.params_to_gemma_tree(params, cfg, transpose_gating=cfg.family != "gemma3")
  _assert_tree_equal(weights.params_from_gemma_tree({"transformer": other}, cfg), params)


def test_gemma_tree_qkv_einsum():
  cfg = dataclasses.replace(gemma.get_config("tiny_gemma2"), n_kv_heads=4)
  params = jax.tree.map(np.asarray, gemma.init_params(jax.random.key(3), cfg))
  tree = weights.params_to_gemma_tree(params, cfg)
  assert tree["layer_0"]["attn"]["qkv_einsum"]["w"].shape == (3, 4, 64, 16)
  x = _x(2, 64)
  q, k, v = np.einsum("BD,SNDH->SBNH", x, tree["layer_1"]["attn"]["qkv_einsum"]["w"])
  np.testing.assert_allclose(k, np.einsum("bd,dkh->bkh", x, params["layers"][1]["k"]), atol=1e-5)
  _assert_tree_equal(weights.params_from_gemma_tree(tree, cfg), params)


def test_orbax_round_trip(model, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg, params = model
  ckpt = tmp_path / "ckpt"
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(ckpt, {"transformer": weights.params_to_gemma_tree(params, cfg)})
  loaded, _ = weights.load_orbax(ckpt, cfg.name)
  _assert_tree_equal(loaded, params)
  with pytest.raises(FileNotFoundError, match="not found"):
    weights.load_orbax(tmp_path / "missing", cfg)


def test_orbax_restores_each_tensor_straight_into_its_sharding(model, tmp_path):
  """On a 2x4 LM mesh each device reads its slice of every tensor from the checkpoint
  (the gemma layout restored split where its transposes give jsae.lm.mesh's layout)."""
  ocp = pytest.importorskip("orbax.checkpoint")
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from jsae.lm import mesh as lm_mesh  # pylint: disable=import-outside-toplevel
  cfg, params = model
  ckpt = tmp_path / "ckpt"
  ocp.PyTreeCheckpointer().save(ckpt, {"transformer": weights.params_to_gemma_tree(params, cfg)})
  mesh = lm_mesh.make_mesh(2, 4)
  raw = weights._restore_orbax(ckpt, cfg, mesh)["transformer"]  # pylint: disable=protected-access
  layer = raw["layer_0"]
  q = layer["attn"]["q_einsum"]["w"] if "q_einsum" in layer["attn"] else None
  assert q is None or q.sharding.spec == P("model", None, None)  # [H, d, h] by heads
  assert raw["embedder"]["input_embedding"].sharding.spec == P("model", None)
  gating = layer["mlp"]["gating_einsum"]
  assert "model" in tuple(gating.sharding.spec)
  assert {s.data.shape for s in gating.addressable_shards} != {gating.shape}  # not whole
  loaded, _ = weights.load_orbax(ckpt, cfg.name, mesh=mesh)
  _assert_tree_equal(jax.tree.map(np.asarray, loaded), params)
  specs = lm_mesh.param_specs(cfg, 4)
  for a, spec in zip(jax.tree.leaves(loaded), jax.tree.leaves(specs, is_leaf=lambda s:
                                                               isinstance(s, P))):
    assert a.sharding.spec == spec


def test_hf_sharded_checkpoint_and_config(model, tmp_path):
  from safetensors.numpy import save_file
  cfg, params = model
  hf = weights.params_to_hf(params, cfg)
  names = sorted(hf)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for fname, keys in shards.items():
    save_file({k: hf[k] for k in keys}, str(tmp_path / fname))
  index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  hf_config = {
      "model_type": "gemma2" if cfg.family == "gemma2" else "gemma3_text",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff, "sliding_window": cfg.sliding_window,
      "rope_theta": cfg.rope_base_global, "query_pre_attn_scalar": 16,
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap, "rms_norm_eps": 1e-6,
      "max_position_embeddings": cfg.max_seq_len,
      "layer_types": ["full_attention" if t == "global" else "sliding_attention"
                      for t in cfg.attention_types],
  }
  if cfg.family == "gemma3":
    hf_config["rope_local_base_freq"] = 10_000.0
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  loaded, loaded_cfg = weights.load_hf(tmp_path)
  assert dataclasses.replace(loaded_cfg, name=cfg.name) == cfg
  _assert_tree_equal(loaded, params)
  # Multimodal Gemma 3 names nest the text model; the prefix is detected.
  nested = weights.params_to_hf(params, cfg, prefix="model.language_model.")
  nested["vision_tower.x.weight"] = np.zeros(3, np.float32)
  _assert_tree_equal(weights.params_from_hf(nested, cfg), params)


def test_own_format_round_trip(model, tmp_path):
  cfg, params = model
  weights.save_params(tmp_path / "p.safetensors", params, cfg)
  loaded, loaded_cfg = weights.load_params(tmp_path / "p.safetensors")
  assert loaded_cfg == cfg
  _assert_tree_equal(loaded, params)


def test_shape_mismatch_errors(model):
  cfg, params = model
  hf = weights.params_to_hf(params, cfg)
  hf["model.layers.3.mlp.down_proj.weight"] = hf["model.layers.3.mlp.down_proj.weight"][:, :5]
  with pytest.raises(ValueError, match=r"HF tensor 'model.layers.3.mlp.down_proj.weight' has"
                     r" shape \(64, 5\), expected \(64, 96\)"):
    weights.params_from_hf(hf, cfg)
  tensors = weights.params_to_gguf(params, cfg)
  del tensors["blk.1.attn_v.weight"]
  with pytest.raises(ValueError, match="no tensor 'blk.1.attn_v.weight'"):
    weights.params_from_gguf(tensors, cfg)
  bigger = dataclasses.replace(cfg, d_ff=128)
  with pytest.raises(ValueError, match=r"gemma-layout tensor 'layer_0/mlp/gating_einsum' has"
                     r" shape"):
    weights.params_from_gemma_tree(weights.params_to_gemma_tree(params, cfg), bigger)
  with pytest.raises(ValueError, match="'gemma2_2b'"):
    weights.params_from_gguf(weights.params_to_gguf(params, cfg), gemma.get_config("gemma2_2b"))


def test_missing_and_unreadable_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file .* not found"):
    weights.load_gguf(tmp_path / "nope.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="could not read .* as GGUF"):
    weights.load_gguf(bad)
  with pytest.raises(FileNotFoundError, match="Hugging Face checkpoint .* not found"):
    weights.load_hf(tmp_path / "no_dir")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .safetensors files"):
    weights.load_hf(tmp_path / "empty", "tiny_gemma2")
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x00" * 10)
  with pytest.raises(ValueError, match="could not read .* as safetensors"):
    weights.load_hf(junk, "tiny_gemma2")
  with pytest.raises(FileNotFoundError, match="params file .* not found"):
    weights.load_params(tmp_path / "none.safetensors")


def test_config_from_sparse_hf_config():
  # Multimodal Gemma 3 config.json files list only non-default text fields.
  cfg = weights.config_from_hf({"model_type": "gemma3", "text_config": {
      "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
      "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
      "sliding_window": 1024, "final_logit_softcapping": None}})
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (2560, 8, 4, 256)
  assert cfg.rope_scale_global == 8.0 and cfg.rope_base_local == 10_000.0
  assert cfg.attention_types[:6] == ("local",) * 5 + ("global",)
  assert cfg.final_logit_softcap is None and cfg.qk_norm
  g2 = weights.config_from_hf({"model_type": "gemma2", "num_hidden_layers": 2})
  assert g2.attn_logit_softcap == 50.0 and g2.attention_types == ("local", "global")
  with pytest.raises(ValueError, match="model_type is 'llama'"):
    weights.config_from_hf({"model_type": "llama"})
