import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite is mostly compilation of small programs: XLA:CPU's code generation without LLVM's optimization passes
# and with its older elemental emitters instead of the MLIR fusion emitters (the same HLO passes, fusions and
# runtime matmuls; no fast math either way) takes about half the CPU time (the suite: 15 min 41 s -> 8 min 23 s on
# 2 cores, docs/benchmarks.md). Commands the tests start get it too (COMPILE_FLAGS in their XLA_FLAGS).
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# 8 fake devices, whose collectives may wait on a loaded machine longer than XLA:CPU's default 40 s
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), COMPILE_FLAGS,
                                    "--xla_force_host_platform_device_count=8",
                                    "--xla_cpu_collective_call_terminate_timeout_seconds=600"]).strip()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# one compilation cache for the session and every command it starts: the many short runs of the same tiny
# configs (resumes, faults, sweeps) compile their programs once; the process that made it (pytest's, whose
# workers inherit it) removes it at exit
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptoss_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(main, *args) -> subprocess.CompletedProcess:
  """A command's main(argv) in this process: its exit status and what it printed. For the tests of what a
  command prints and returns (bad input is one line, exit status 2); those about processes, signals or the
  working directory start real ones."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's errors
      code = e.code
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
  """family -> (folder of a saved tiny random HF model, the torch model); built once per session."""
  from hf_models import save_hf_model
  cache = {}

  def get(family: str):
    if family not in cache:
      folder = tmp_path_factory.mktemp(family)
      cache[family] = (folder, save_hf_model(family, folder))
    return cache[family]

  return get


TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be
in want of a wife. However little known the feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered
the rightful property of some one or other of their daughters.
"""


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory):
  """A small prepared byte-level dataset (no network): 40 documents, 4 of them in val and 4 in test."""
  from gptoss_jax.data.prepare import prepare
  folder = tmp_path_factory.mktemp("text")
  for i in range(40):
    (folder / f"doc{i:02d}.txt").write_text(f"Chapter {i}.\n" + TEXT * (2 + i % 7))
  out = folder / "prepared"
  prepare(out, "text", "byte", path=str(folder / "doc*.txt"), val_fraction=0.1, test_fraction=0.1, progress=False)
  return out
