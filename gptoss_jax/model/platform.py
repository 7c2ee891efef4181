"""The platform whose program a model builds, an input rather than a fact of the process running it.

`ModelConfig.platform` decides the algorithms (MoE dispatch, attention kernel, the compute dtype of few-row
products); `auto` is the backend this process runs on. So a CPU process traces, exports and runs (with XLA's
formulation of each platform-only kernel) exactly the program a GPU or TPU would. Within that program a kernel
that exists on one platform only is chosen by the platform it is lowered for (`per_lowering`), never by the
process: exported for cuda it is cuDNN's, compiled for CPU it is the XLA fallback.
"""

from collections.abc import Callable

import jax

from gptoss_jax.config import ModelConfig


def target(cfg: ModelConfig) -> str:
  """cpu | gpu | tpu: cfg.platform, or for `auto` the backend of this process."""
  if cfg.platform != "auto":
    return cfg.platform
  backend = jax.default_backend()
  return backend if backend in ("cpu", "tpu") else "gpu"  # cuda and rocm alike


def per_lowering(*args, default: Callable, **kernels: Callable | None):
  """default(*args), or kernels[p](*args) where the program is lowered for platform p (cpu | cuda | rocm |
  tpu); a kernel given as None is left out (one that cannot be traced in this process)."""
  kernels = {p: k for p, k in kernels.items() if k is not None}
  if not kernels:
    return default(*args)
  return jax.lax.platform_dependent(*args, default=default, **kernels)
