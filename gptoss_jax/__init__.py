"""gptoss_jax: a JAX/Flax research codebase for the architecture changes from GPT-2 to gpt-oss."""

# Importing the package changes nothing in the process: the commands apply their process-wide settings
# (XLA flags, host memory) at their entry point, and so can a library user (gptoss_jax.runtime). Nor does
# it import JAX: the model's names load on first use, so `import gptoss_jax.config` (or a data worker
# process) stays light.
from gptoss_jax.config import ConfigError, ModelConfig

_MODEL_NAMES = ("KVCache", "ModelOutput", "Transformer")


def __getattr__(name: str):
  if name in _MODEL_NAMES:
    from gptoss_jax import model
    return getattr(model, name)
  raise AttributeError(f"module 'gptoss_jax' has no attribute {name!r}")


def load_pretrained(path, dtype: str = "float32", keep_mxfp4: bool = False):
  """Loads a Hugging Face folder (config.json + safetensors) into (ModelConfig, Transformer)."""
  from gptoss_jax.convert.hf import load_pretrained as _load
  return _load(path, dtype=dtype, keep_mxfp4=keep_mxfp4)


__all__ = ["ConfigError", "KVCache", "ModelConfig", "ModelOutput", "Transformer", "load_pretrained"]
