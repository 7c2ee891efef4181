import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
