"""Model weights on disk (orbax), with no optimizer and no Trainer: what a conversion writes, and what
evaluation and generation read, from a conversion or from a training run's checkpoints.

A folder holds `config.json` (the run config) and `checkpoints/<step>/`: a conversion's step holds the
item `weights` (the model's weights, model.WEIGHTS); a training run's holds `state` (the train state,
of which only the parameters and the rest of the model state are read here) and `record`.

Memory stays near the weights' own size (gpt-oss-20b's 12.8 GiB must load on a 16 GB machine): arrays
are read one after another straight from orbax's files with TensorStore into host memory aligned for JAX,
which takes it on CPU without a copy (orbax's own restore read everything at once, each array twice: its
read buffer and the device copy); conversions are written as they are converted, in groups (orbax's
partial saves: the whole model is never held) and chunks of at most CHUNK_BYTES (a read holds one chunk's
compressed bytes beside the weights).
"""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import shutil
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts
from flax import nnx

from gptoss_jax import runtime
from gptoss_jax.config import ConfigError, RunConfig
from gptoss_jax.config_files import overridden
from gptoss_jax.fileio import atomic_folder
from gptoss_jax.model import WEIGHTS, Transformer, fresh_rest, rngs


def is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
  """Typed PRNG keys (dropout streams) are stored as their raw uint32 data (arrays or abstract)."""
  def one(x):
    if not is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)
  return jax.tree.map(one, tree)


def data_to_keys(tree, like):
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x) if is_key(ref) else x, tree, like)


CHUNK_BYTES = 64 * 2**20  # a conversion's arrays are stored in chunks of at most this many bytes
GROUP_BYTES = 512 * 2**20  # a conversion writes its arrays in groups of about this many bytes


@contextlib.contextmanager
def weights_writer(dst: str | Path, config: RunConfig, record: dict | None = None):
  """Writes a model's weights as they come: yields `add(name, array)` (name: the weight's path joined by
  dots, `blocks.0.attn.wq`), and the arrays are written in groups of about GROUP_BYTES (orbax's partial
  saves), so a conversion never holds the whole model. Gives DIR/config.json + DIR/checkpoints/0/weights
  (an orbax PyTree item; `record.json` beside it), written to a temporary folder beside DIR and renamed at
  the end: never half-written."""
  from orbax.checkpoint.experimental import v1
  saving = v1.options.ArrayOptions.Saving
  context = v1.Context(array_options=v1.options.ArrayOptions(
      saving=saving(storage_options=saving.StorageOptions(chunk_byte_size=CHUNK_BYTES))))
  with atomic_folder(dst) as tmp:
    staged, group, size = tmp / "staged", {}, [0]

    def flush():
      if group:
        with context:
          v1.partial.save(staged, group)
        group.clear()
        size[0] = 0

    def add(name: str, array) -> None:
      node = group
      for key in name.split("."):
        node = node.setdefault(key, {})
      node["value"] = np.asarray(array)  # nnx's variables: orbax names them <path>.value
      size[0] += node["value"].nbytes
      if size[0] >= GROUP_BYTES:
        flush()

    yield add
    flush()
    v1.partial.finalize(staged)
    step = tmp / "checkpoints" / "0"
    step.mkdir(parents=True)
    (staged / "state").rename(step / "weights")
    shutil.rmtree(staged)
    (step / "record.json").write_text(json.dumps(record or {}))
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def save_model(dst: str | Path, config: RunConfig, model, record: dict | None = None) -> Path:
  """A model without optimizer state (a conversion) written by weights_writer."""
  with weights_writer(dst, config, record) as add:
    for path, variable in nnx.to_flat_state(nnx.state(model, WEIGHTS)):
      add(".".join(map(str, path)), variable.get_value())
  return Path(dst).absolute()


HUGE_PAGE = 2 * 2**20


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """Uninitialised host memory starting at a 64-byte boundary: JAX's CPU client takes such an array as it is,
  without a copy (a plain numpy array is 16-byte aligned and gets copied). Arrays of HUGE_PAGE or more start
  at a HUGE_PAGE boundary of their own anonymous mapping, which the kernel is asked to back with huge pages
  (madvise; Linux's default THP setting gives them only when asked): decoding reads every weight once per
  token, and a plain streaming read of 1.16 GB (the unembedding) on 2 AMD EPYC cores ran at 21-30 GiB/s in
  4 KiB pages against 31-48 in 2 MiB ones, side by side (docs/inference.md). Freed, the mapping goes back to
  the OS at once."""
  dtype = np.dtype(dtype)
  n_bytes = int(np.prod(shape)) * dtype.itemsize
  if n_bytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
    mapping = mmap.mmap(-1, n_bytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    raw = np.frombuffer(mapping, np.uint8)  # which keeps the mapping alive
    start = -raw.ctypes.data % HUGE_PAGE
    mapping.madvise(mmap.MADV_HUGEPAGE, start, n_bytes // HUGE_PAGE * HUGE_PAGE)  # the tail: no page past the end
  else:
    raw = np.empty(n_bytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
  return raw[start:start + n_bytes].view(dtype).reshape(shape)


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


IN_FLIGHT_BYTES = 128 * 2**20  # arrays read at once, by their size (at least one)


def read_item(item_dir: Path, like, device: jax.Device | None = None):
  """The arrays of an orbax item (OCDBT, as orbax writes by default) that `like` names (an abstract tree;
  orbax's names join its keys with dots), placed on `device`. Each array is read straight into its final
  host buffer (cast there if stored in another dtype), a few at a time (IN_FLIGHT_BYTES), and handed to
  the device as soon as it is read. Missing or misshaped arrays raise ConfigError."""
  device = device or jax.devices()[0]
  meta = json.loads((item_dir / "_METADATA").read_text())
  if not meta.get("use_ocdbt", True):
    raise ConfigError(f"{item_dir} is not in orbax's OCDBT format")
  driver = "zarr3" if meta.get("use_zarr3") else "zarr"
  stored = {".".join(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()}
  kvstore = {"driver": "ocdbt", "base": f"file://{item_dir.absolute()}"}
  context = ts.Context()  # one cache and thread pool for all arrays
  paths, abstract = zip(*jax.tree_util.tree_flatten_with_path(like)[0])
  arrays, pending = [None] * len(paths), collections.deque()  # pending: (index, host buffer, write future)

  def finish():
    i, out, write = pending.popleft()
    write.result()
    arrays[i] = jax.device_put(out, device)  # no copy on CPU (aligned); a host-to-device copy elsewhere

  for i, (path, x) in enumerate(zip(paths, abstract)):
    name = ".".join(_key_name(k) for k in path)
    if name not in stored:
      raise ConfigError(f"{item_dir} has no array {name}")
    array = ts.open({"driver": driver, "kvstore": kvstore | {"path": name}}, open=True, context=context).result()
    if tuple(array.shape) != tuple(x.shape):
      raise ConfigError(f"{item_dir}: {name} has shape {tuple(array.shape)}, the model's is {tuple(x.shape)}")
    out = aligned_empty(x.shape, x.dtype)
    source = array if array.dtype == ts.dtype(out.dtype) else ts.cast(array, out.dtype)
    pending.append((i, out, ts.array(out).write(source)))
    while sum(p[1].nbytes for p in pending) > IN_FLIGHT_BYTES:
      finish()
  while pending:
    finish()
  return jax.tree.unflatten(jax.tree.structure(like), arrays)


def steps(directory: Path) -> list[int]:
  folder = directory / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def read_config(directory: str | Path) -> RunConfig:
  """The run config a training or conversion saved beside its checkpoints."""
  path = Path(directory) / "config.json"
  if not path.is_file():
    raise ConfigError(f"{Path(directory).absolute()} is not a checkpoint folder (no config.json)")
  return RunConfig.from_dict(json.loads(path.read_text()))


def _overridden(config: RunConfig, overrides: dict[str, str]) -> RunConfig:
  not_model = [k for k in overrides if not k.startswith("model.")]
  if not_model:
    raise ConfigError(f"only model fields can be changed at evaluation, not {', '.join(not_model)}")
  changed = overridden(config, overrides)
  shapes = lambda cfg: [(jax.tree_util.keystr(path), a.shape) for path, a in jax.tree_util.tree_leaves_with_path(
      nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs()))))]
  if shapes(changed.model) != shapes(config.model):
    raise ConfigError(f"{', '.join('--config.' + k for k in overrides)} would change the weights' shapes: only "
                      "fields that keep them (positions, windows, kernels) can be changed at evaluation")
  return changed


def load_model(directory: str | Path, step: int | None = None, overrides: dict[str, str] | None = None):
  """The newest checkpoint of a training run or a conversion (or the one at `step`) -> (run config,
  ModelConfig, model in eval mode), on one device. `overrides` ({"model.position": "yarn", ...}, strings as
  on a command line) change model fields that leave every weight's shape as it is (positions, windows,
  attention kernels); one that would change a shape is refused, naming it."""
  directory = Path(directory).absolute()
  config = read_config(directory)
  if overrides:
    config = _overridden(config, overrides)
  cfg = config.model
  available = steps(directory)
  if not available:
    raise ConfigError(f"{directory}/checkpoints holds no checkpoint")
  if step is not None and step not in available:
    raise ConfigError(f"{directory}/checkpoints has no step {step} (steps: {', '.join(map(str, available))})")
  step = available[-1] if step is None else step
  step_dir = directory / "checkpoints" / str(step)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs()))
  try:
    if (step_dir / "weights").is_dir():  # a conversion
      graphdef, weights, rest = nnx.split(abstract, WEIGHTS, ...)
      model = nnx.merge(graphdef, read_item(step_dir / "weights", weights), fresh_rest(rest))
    else:  # a training run: its parameters and model state, not the optimizer's
      graphdef, params, others = nnx.split(abstract, nnx.Param, ...)
      restored = read_item(step_dir / "state", {"params": params, "rest": keys_to_data(others)})
      model = nnx.merge(graphdef, restored["params"], data_to_keys(restored["rest"], others))
  except ConfigError:
    raise
  except Exception as e:  # tensorstore raises many kinds for missing or corrupt files
    raise ConfigError(f"{step_dir} could not be read ({type(e).__name__}: {str(e)[:200]})") from None
  runtime.release_free_memory()  # the reads' buffers, before the weights' first use
  model.eval()
  return config, cfg, model
