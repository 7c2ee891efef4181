"""Model weights on disk: conversions are written in bounded chunks and read back exactly, array by array;
checkpoints written by orbax's plain save (earlier conversions) and training runs read the same."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx

from gptoss_jax import weights
from gptoss_jax.config import ConfigError, ModelConfig, RunConfig
from gptoss_jax.model import WEIGHTS, Transformer

CFG = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                  n_experts=4, top_k=2, d_expert=24, param_dtype="bfloat16")


def flat(model) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, WEIGHTS))[0]}


def assert_same_weights(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    assert fa[name].dtype == fb[name].dtype and fa[name].shape == fb[name].shape, name
    np.testing.assert_array_equal(fa[name].view(np.uint8), fb[name].view(np.uint8), err_msg=name)


def test_a_conversion_is_written_in_bounded_chunks_and_read_back_exactly(tmp_path, monkeypatch):
  monkeypatch.setattr(weights, "CHUNK_BYTES", 4096)  # several chunks per matrix at this size
  monkeypatch.setattr(weights, "GROUP_BYTES", 20_000)  # written in several groups
  monkeypatch.setattr(weights, "IN_FLIGHT_BYTES", 1)  # read one array at a time
  model = Transformer(CFG, nnx.Rngs(3))
  weights.save_model(tmp_path / "ckpt", RunConfig(model=CFG), model)
  item = tmp_path / "ckpt" / "checkpoints" / "0" / "weights"
  driver = "zarr3" if json.loads((item / "_METADATA").read_text())["use_zarr3"] else "zarr"
  embed = ts.open({"driver": driver, "kvstore": {"driver": "ocdbt", "base": f"file://{item}", "path": "embed.value"}},
                  open=True).result()
  chunk = embed.chunk_layout.read_chunk.shape
  assert np.prod(chunk) * 2 <= 4096 and tuple(chunk) != tuple(embed.shape)  # bfloat16: 2 bytes
  assert len(list(item.glob("ocdbt.process_*"))) > 1  # one per group
  _, cfg, back = weights.load_model(tmp_path / "ckpt")
  assert cfg == CFG
  assert_same_weights(model, back)


def test_a_checkpoint_saved_by_orbax_alone_and_in_another_dtype_reads_the_same(tmp_path):
  """Conversions written before chunking (orbax's plain save); and a float32 store cast on reading."""
  model = Transformer(CFG, nnx.Rngs(4))
  folder = tmp_path / "old"
  with ocp.CheckpointManager(folder / "checkpoints", options=ocp.CheckpointManagerOptions(create=True)) as manager:
    manager.save(0, args=ocp.args.Composite(weights=ocp.args.StandardSave(nnx.state(model, WEIGHTS))))
  (folder / "config.json").write_text(json.dumps(RunConfig(model=CFG).to_dict()))
  assert_same_weights(model, weights.load_model(folder)[2])
  wide = CFG.replace(param_dtype="float32")
  (folder / "config.json").write_text(json.dumps(RunConfig(model=wide).to_dict()))
  back, stored = flat(weights.load_model(folder)[2]), flat(model)
  floating = [name for name, x in stored.items() if jax.dtypes.issubdtype(x.dtype, jnp.floating)]
  assert any(stored[name].dtype != np.float32 for name in floating)  # there is something to cast
  for name in floating:
    assert back[name].dtype == np.float32, name
    np.testing.assert_array_equal(back[name], stored[name].astype(np.float32), err_msg=name)


def test_a_checkpoint_of_another_shape_or_with_an_array_missing_is_one_clear_error(tmp_path):
  weights.save_model(tmp_path / "ckpt", RunConfig(model=CFG), Transformer(CFG, nnx.Rngs(0)))
  config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  config["model"]["d_expert"] = 36
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=r"ffn\.w_in\.value has shape \(4, 32, 2, 24\), the model's is \(4, 32, 2, 36\)"):
    weights.load_model(tmp_path / "ckpt")
  config["model"] |= {"d_expert": 24, "n_layers": 3}
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="has no array blocks.2"):
    weights.load_model(tmp_path / "ckpt")


def test_host_buffers_are_aligned_for_jax_and_large_ones_for_huge_pages():
  """Loaded arrays go to the CPU device without a copy (64-byte aligned), and those of a huge page or more
  start on a huge page's boundary; every byte is writable and reads back."""
  for shape, dtype, boundary in (((3, 5), np.float32, 64), ((weights.HUGE_PAGE // 2 + 7,), np.uint16, weights.HUGE_PAGE),
                                 ((3, weights.HUGE_PAGE // 3), jnp.bfloat16, weights.HUGE_PAGE)):
    host = weights.aligned_empty(shape, dtype)
    assert host.shape == shape and host.dtype == np.dtype(dtype) and host.ctypes.data % boundary == 0
    host[...] = np.arange(host.size).reshape(shape).astype(dtype)
    device = jax.device_put(host, jax.devices("cpu")[0])
    assert device.unsafe_buffer_pointer() == host.ctypes.data  # taken as it is
    np.testing.assert_array_equal(np.asarray(device), np.arange(host.size).reshape(shape).astype(dtype))
