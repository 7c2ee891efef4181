"""The CPU kernel for MXFP4 matrix-vector products (mxfp4_matvec.cc), built at first use.

XLA:CPU computes a packed expert's product by writing the dequantized float32 weight and reading it back,
which bounds decoding (about 0.5 ns a weight on 2 cores); the kernel reads the packed bytes once. It is
compiled with the system's g++ against the XLA FFI headers jaxlib ships, into a cache folder
($GPTOSS_JAX_CACHE, else ~/.cache/gptoss_jax), once per source, jaxlib version and CPU. Without a
compiler, or with GPTOSS_JAX_KERNELS=0, `matvec` computes the same with XLA's gather and dequantize.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from gptoss_jax.model import mxfp4

SOURCE = Path(__file__).with_name("mxfp4_matvec.cc")
TARGET = "gptoss_mxfp4_matvec"


def _cpu_id() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build() -> Path:
  key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode() + _cpu_id().encode()).hexdigest()[:16]
  cache = Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss_jax"))
  library = cache / f"mxfp4_matvec-{key}.so"
  if not library.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved in whole: never half-written
      built = Path(tmp) / library.name
      subprocess.run(["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
                      f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                     check=True, capture_output=True, text=True)
      os.replace(built, library)
  return library


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered (on CPU only; once per process)."""
  if os.environ.get("GPTOSS_JAX_KERNELS", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
    print(f"gptoss_jax: the MXFP4 CPU kernel could not be built ({detail}); using XLA's slower path",
          file=sys.stderr)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.GptossMxfp4Matvec), platform="cpu")
  return True


def _gathered(experts_A, blocks, scales) -> jax.Array:
  """[A, O, I] float32: each assignment's expert, dequantized."""
  return mxfp4.dequantize(blocks[experts_A], scales[experts_A], jnp.float32)


def reference(x_AxI: jax.Array, experts_A: jax.Array, blocks: jax.Array, scales: jax.Array) -> jax.Array:
  """The same product in XLA: the chosen experts gathered, dequantized to float32, multiplied."""
  w_AxOxI = _gathered(experts_A, blocks, scales)
  return jax.lax.dot_general(x_AxI.astype(jnp.float32), w_AxOxI, (((1,), (2,)), ((0,), (0,))))


def matvec(x_AxI: jax.Array, experts_A: jax.Array, blocks: jax.Array, scales: jax.Array) -> jax.Array:
  """y[a] = W[experts[a]] @ x[a] in float32, for packed weights [E, *out, I / 32, 16] and scales
  [E, *out, I / 32] (the output dimensions flattened): the kernel where the program runs on CPU, XLA's
  `reference` on other platforms (chosen when the program is lowered, so exports for GPU and TPU hold no
  CPU call). Differentiable in x (the packed weights are never trained)."""
  E, nb = blocks.shape[0], blocks.shape[-2]
  blocks, scales = blocks.reshape(E, -1, nb, 16), scales.reshape(E, -1, nb)
  x_AxI, experts_A = x_AxI.astype(jnp.float32), experts_A.astype(jnp.int32)
  if not available():
    return reference(x_AxI, experts_A, blocks, scales)
  return _on_cpu(x_AxI, experts_A, blocks, scales)


@jax.custom_vjp
def _on_cpu(x_AxI, experts_A, blocks, scales):
  out = jax.ShapeDtypeStruct((x_AxI.shape[0], blocks.shape[1]), jnp.float32)
  kernel = lambda *args: jax.ffi.ffi_call(TARGET, out)(*args)
  return jax.lax.platform_dependent(x_AxI, experts_A, blocks, scales, cpu=kernel, default=reference)


def _on_cpu_fwd(x_AxI, experts_A, blocks, scales):
  return _on_cpu(x_AxI, experts_A, blocks, scales), (experts_A, blocks, scales)


def _on_cpu_bwd(residuals, dy_AxO):
  return jnp.einsum("ao,aoi->ai", dy_AxO, _gathered(*residuals)), None, None, None


_on_cpu.defvjp(_on_cpu_fwd, _on_cpu_bwd)
