"""Process-wide settings, applied by the commands at their entry point (never by importing the package).
A library user who wants the same behaviour calls them before JAX starts its backend:

  from gptoss_jax import runtime
  runtime.configure()                     # what every command applies
  runtime.reuse_step_memory()             # what `python -m gptoss_jax.train` adds on CPU-only hosts
  runtime.inference_memory()              # what evaluate and generate add: most of an accelerator's memory
  runtime.cache_compilations()            # what evaluate, generate and lm_eval add: compiled programs kept

The figures behind these choices are in the README (Benchmarks) and `benchmarks/`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# XLA:CPU's concurrency-optimized scheduler starts independent work early, so a forward pass holds every
# layer's converted weights at once (the README's MXFP4 memory figures); a per-jit compiler option did
# not take effect, so the choice is process-wide
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def configure() -> None:
  """XLA flags for this process (read when JAX starts its backend); a flag the user set wins."""
  flags = os.environ.get("XLA_FLAGS", "")
  if SCHEDULER_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()


# evaluate and generate hold the weights and little else: JAX's default share of an accelerator (75%) leaves
# 11.2 GiB of a 16 GB card, less than gpt-oss-20b's 12.8 GiB of weights with packed experts
INFERENCE_MEMORY_FRACTION = "0.95"


def inference_memory() -> None:
  """Lets this process take INFERENCE_MEMORY_FRACTION of the accelerator's memory (read when JAX starts its
  backend); a XLA_PYTHON_CLIENT_MEM_FRACTION the user set wins. No effect on CPU."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", INFERENCE_MEMORY_FRACTION)


def reuse_step_memory() -> bool:
  """On a CPU-only host with glibc, lets every train step reuse the same host memory for its temporaries.

  XLA:CPU allocates a step's temporaries afresh on every call; glibc serves blocks that large from fresh
  mappings and unmaps them when they are freed, so every step page-faults through all of it again. This
  runs steps on the calling thread (no asynchronous CPU dispatch) from glibc's main heap, with no mappings
  and freed memory kept. Call it before JAX starts its backend. It is skipped (returns False) off glibc,
  or when a GPU/TPU plugin could take over.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  plugins = any(importlib.metadata.entry_points(group="jax_plugins")) or importlib.util.find_spec("libtpu")
  cpu_only = platforms == "cpu" or (not platforms and not plugins)
  if not cpu_only or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters (malloc.h)
  libc.mallopt(m_mmap_max, 0)
  libc.mallopt(m_trim_threshold, 2**31 - 1)
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def release_free_memory() -> None:
  """Hands the heap's free memory back to the OS (glibc; elsewhere nothing): reuse_step_memory keeps freed
  memory for the next step, so the buffers of a one-off phase (loading a checkpoint) would otherwise stay
  resident beside the weights."""
  if platform.libc_ver()[0] == "glibc":
    ctypes.CDLL(None).malloc_trim(0)


def cache_compilations() -> None:
  """Keeps compiled programs across runs (JAX's persistent compilation cache) in cache_dir()/jax, unless
  JAX_COMPILATION_CACHE_DIR names another place; only programs that took a second or more to compile (JAX's
  default), and only if called before the process's first compilation. gpt-oss-20b's 24 layers on 2 CPU
  cores: the first `generate` of 16 tokens after a 64-token prompt took 14.7 s, 11.2 s with its programs
  cached (docs/inference.md)."""
  import jax
  from gptoss_jax.fileio import cache_dir
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
