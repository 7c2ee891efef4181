"""CPU kernels for decoding's matrix-vector products (cpu_kernels.cc), built at first use.

XLA:CPU computes a product of a few rows with a packed MXFP4 or a bfloat16 weight by writing a float32
copy of the weight and reading it back, which bounds decoding (a packed expert: about 0.5 ns a weight on 2
cores); the kernels read the weight once. They are compiled with the system's g++ against the XLA FFI
headers jaxlib ships, into a cache folder ($GPTOSS_JAX_CACHE, else ~/.cache/gptoss_jax), once per source,
jaxlib version, CPU, compiler version and flags, under a file lock (processes starting together build it
once). Without a compiler, or with GPTOSS_JAX_KERNELS=0, the same products run in XLA;
GPTOSS_JAX_KERNELS=avx2 or plain builds them as a CPU without AVX-512 or without AVX2 would (x86-64), to
compare the builds on one machine.
Which one runs is chosen when a program is lowered, so programs for GPU and TPU never hold a CPU call.

The contract, the same for both products: call them anywhere; each runs its kernel on CPU where the kernels
are `available()` and XLA's product otherwise (GPU, TPU, no compiler), with the same result up to rounding. An expert
index out of range is clamped to the nearest expert on both paths (XLA's gather semantics; the router never
makes one). The kernels check every operand's and the output's shape and fail with a message otherwise.
"""

from __future__ import annotations

import ctypes
import fcntl
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
import numpy as np

from gptoss_jax.fileio import cache_dir
from gptoss_jax.model import mxfp4

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
MXFP4_TARGET, BF16_TARGET = "gptoss_mxfp4_matvec", "gptoss_bf16_matvec"
MAX_ROWS = 16  # bf16_matvec's rows at most
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w")
# GPTOSS_JAX_KERNELS: 1 the CPU's own build, avx2 / plain as a CPU without AVX-512 / AVX2 builds it, 0 none
BUILDS = {"1": (), "avx2": ("-mno-avx512f",), "plain": ("-mno-avx2", "-mno-fma")}


def _choice() -> str:
  choice = os.environ.get("GPTOSS_JAX_KERNELS", "1")
  if choice not in (*BUILDS, "0"):
    raise ValueError(f"GPTOSS_JAX_KERNELS={choice!r}: want 1 (this CPU's build), avx2, plain (x86-64) or 0 (none)")
  return choice


def _cpuinfo() -> list[str]:
  try:
    return Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return []


def _cpu_id() -> str:
  lines = _cpuinfo()
  if not lines:
    return platform.processor()
  return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compiler() -> str:
  """The compiler's version line: a new compiler makes a new build."""
  return subprocess.run(["g++", "--version"], check=True, capture_output=True, text=True).stdout.split("\n")[0]


def _compile(library: Path, flags: tuple[str, ...]) -> None:
  subprocess.run(["g++", *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(library)],
                 check=True, capture_output=True, text=True)


def _build() -> Path:
  flags = (*FLAGS, *BUILDS[_choice()])
  parts = (SOURCE.read_text(), jaxlib.__version__, _cpu_id(), _compiler(), *flags)
  key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
  cache = cache_dir()
  cache.mkdir(parents=True, exist_ok=True)
  library = cache / f"cpu_kernels-{key}.so"
  with open(cache / "cpu_kernels.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then find the library
    if not library.is_file():
      with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved in whole: never half-written
        _compile(Path(tmp) / library.name, flags)
        os.replace(Path(tmp) / library.name, library)
  return library


def instruction_set() -> str:
  """Which of the kernels' builds this CPU gets (-march=native, as GPTOSS_JAX_KERNELS limits it;
  cpu_kernels.cc): "AVX-512" (with VNNI), "AVX2", or "plain C++"."""
  flags = {flag for line in _cpuinfo() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
  choice = _choice()
  if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags and choice == "1":
    return "AVX-512"
  return "AVX2" if {"avx2", "fma"} <= flags and choice in ("1", "avx2") else "plain C++"


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered (for CPU; once per process)."""
  if _choice() == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
    print(f"gptoss_jax: the CPU kernels could not be built ({detail}); using XLA's slower products",
          file=sys.stderr)
    return False
  jax.ffi.register_ffi_target(MXFP4_TARGET, jax.ffi.pycapsule(library.GptossMxfp4Matvec), platform="cpu")
  jax.ffi.register_ffi_target(BF16_TARGET, jax.ffi.pycapsule(library.GptossBf16Matvec), platform="cpu")
  return True


def _gathered(experts_A, blocks, scales) -> jax.Array:
  """[A, O, I] float32: each assignment's expert, dequantized."""
  return mxfp4.dequantize(blocks[experts_A], scales[experts_A], jnp.float32)


def mxfp4_reference(x_AxI: jax.Array, experts_A: jax.Array, blocks: jax.Array, scales: jax.Array) -> jax.Array:
  """The same product in XLA: the chosen experts gathered, dequantized to float32, multiplied."""
  w_AxOxI = _gathered(experts_A, blocks, scales)
  return jax.lax.dot_general(x_AxI.astype(jnp.float32), w_AxOxI, (((1,), (2,)), ((0,), (0,))))


def mxfp4_matvec(x_AxI: jax.Array, experts_A: jax.Array, blocks: jax.Array, scales: jax.Array,
                 rounded: bool | None = None) -> jax.Array:
  """y[a] = W[experts[a]] @ x[a] in float32, for packed weights [E, *out, I / 32, 16] and scales
  [E, *out, I / 32] (the output dimensions flattened): the kernel on CPU, `mxfp4_reference` elsewhere or
  without the kernels. Differentiable in x (the packed weights are never trained). `rounded` (default:
  whether x is bfloat16; a model computing in bfloat16 says so for its float32 copies): the AVX2 and
  AVX-512 kernels multiply x as 16-bit integers per block of 32 with a power-of-two scale, exact for
  bfloat16 values within a factor 128 of their block's largest, and otherwise off by at most 2^-16 of the
  power of two above it (cpu_kernels.cc); else in float32."""
  E, nb = blocks.shape[0], blocks.shape[-2]
  blocks, scales = blocks.reshape(E, -1, nb, 16), scales.reshape(E, -1, nb)
  rounded = x_AxI.dtype == jnp.bfloat16 if rounded is None else rounded
  x_AxI, experts_A = x_AxI.astype(jnp.float32), jnp.clip(experts_A.astype(jnp.int32), 0, E - 1)
  if not available():
    return mxfp4_reference(x_AxI, experts_A, blocks, scales)
  return _mxfp4(x_AxI, experts_A, blocks, scales, rounded)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mxfp4(x_AxI, experts_A, blocks, scales, rounded):
  out = jax.ShapeDtypeStruct((x_AxI.shape[0], blocks.shape[1]), jnp.float32)
  kernel = lambda *args: jax.ffi.ffi_call(MXFP4_TARGET, out)(*args, rounded=np.int32(rounded))
  return jax.lax.platform_dependent(x_AxI, experts_A, blocks, scales, cpu=kernel, default=mxfp4_reference)


def _mxfp4_fwd(x_AxI, experts_A, blocks, scales, rounded):
  return _mxfp4(x_AxI, experts_A, blocks, scales, rounded), (experts_A, blocks, scales)


def _mxfp4_bwd(rounded, residuals, dy_AxO):
  return jnp.einsum("ao,aoi->ai", dy_AxO, _gathered(*residuals)), None, None, None


_mxfp4.defvjp(_mxfp4_fwd, _mxfp4_bwd)


def bf16_reference(x_RxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """The same product in XLA: bfloat16 operands, float32 sums (native on GPU and TPU)."""
  return jax.lax.dot_general(x_RxI.astype(jnp.bfloat16), w_IxO, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def bf16_matvec(x_RxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
  """x @ w in float32 for up to MAX_ROWS rows of x (float32) and a bfloat16 weight stored [in, out]: the
  kernel on CPU (reading the weight once, the rows' products in float32 from the bfloat16 weight),
  `bf16_reference` on other platforms; on CPU without the kernels, the same product in float32 by XLA.
  Differentiable in both."""
  return bf16_matvecs(x_RxI, (w_IxO,))[0]


def bf16_matvecs(x_RxI: jax.Array, ws_IxO: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """x @ w for each of several weights, as `bf16_matvec`, in one call of the kernel (decoding's q, k and v:
  one start of its threads)."""
  ws_IxO = tuple(ws_IxO)
  if not available():
    x = x_RxI.astype(jnp.float32)
    return tuple(jax.lax.dot_general(x, w.astype(jnp.float32), (((1,), (0,)), ((), ()))) for w in ws_IxO)
  return _bf16(x_RxI, ws_IxO)


def _bf16_references(x_RxI, *ws_IxO):
  return tuple(bf16_reference(x_RxI, w) for w in ws_IxO)


@jax.custom_vjp
def _bf16(x_RxI, ws_IxO):
  outs = [jax.ShapeDtypeStruct((x_RxI.shape[0], w.shape[1]), jnp.float32) for w in ws_IxO]
  kernel = lambda x, *ws: tuple(jax.ffi.ffi_call(BF16_TARGET, outs)(x.astype(jnp.float32), *ws))
  return jax.lax.platform_dependent(x_RxI, *ws_IxO, cpu=kernel, default=_bf16_references)


def _bf16_fwd(x_RxI, ws_IxO):
  return _bf16(x_RxI, ws_IxO), (x_RxI, ws_IxO)


def _bf16_bwd(residuals, dys_RxO):
  x_RxI, ws_IxO = residuals
  dx = sum(dy @ w.astype(jnp.float32).T for dy, w in zip(dys_RxO, ws_IxO)).astype(x_RxI.dtype)
  x = x_RxI.astype(jnp.float32)
  return dx, tuple((x.T @ dy).astype(w.dtype) for dy, w in zip(dys_RxO, ws_IxO))


_bf16.defvjp(_bf16_fwd, _bf16_bwd)
