"""gptoss_jax: a JAX/Flax research codebase for the architecture changes from GPT-2 to gpt-oss."""

import os

# XLA:CPU's concurrency-optimized scheduler starts independent work early, so a forward pass holds every
# layer's converted weights at once (gpt-oss-20b with MXFP4 experts: 17.5 GiB against 13.4 GiB). Off, the
# benchmark's train steps are 1-3% slower on 2 cores; a per-jit compiler option did not take effect, so
# the choice is process-wide. Read when JAX starts its backend; a user's own XLA_FLAGS setting wins.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()

from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax.model import KVCache, ModelOutput, Transformer


def load_pretrained(path, dtype: str = "float32", keep_mxfp4: bool = False):
  """Loads a Hugging Face folder (config.json + safetensors) into (ModelConfig, Transformer)."""
  from gptoss_jax.convert.hf import load_pretrained as _load
  return _load(path, dtype=dtype, keep_mxfp4=keep_mxfp4)


__all__ = ["ConfigError", "KVCache", "ModelConfig", "ModelOutput", "Transformer", "load_pretrained"]
