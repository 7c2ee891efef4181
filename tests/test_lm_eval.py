"""lm-evaluation-harness: this codebase's model (a converted checkpoint) against the harness's own `hf` model on
the same small Hugging Face model, through the harness's evaluator, offline (tasks defined here over a local
JSON file): per-request log-likelihoods, greedy flags, rolling log-likelihoods, generated text and metrics."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import run_command
from hf_models import hf_config

MAX_LENGTH = 40  # shorter than the longest requests: truncation from the left is exercised
TASKS = ("tiny_mc", "tiny_rolling", "tiny_gen")


def small_hf_model(family: str, folder, seed: int = 0):
  """A random model of odd sizes over the byte tokenizer (its tokenizer.json written here, end of text = byte 0),
  saved as transformers saves it."""
  from gptoss_jax.convert.export import TOKENIZER_KEY
  from gptoss_jax.convert.tokenizer import byte_to_unicode, tokenizer_json
  from gptoss_jax.data.tokenizers import get_tokenizer
  config = (transformers.GPT2Config(vocab_size=256, n_positions=48, n_embd=48, n_layer=3, n_head=3)
            if family == "gpt2" else hf_config("gpt_oss"))
  config.vocab_size = 256
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (0.5 if "router" in name else 0.2))
  model.eval().save_pretrained(folder)
  saved = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(saved | {TOKENIZER_KEY: "byte", "bos_token_id": None,
                                                          "eos_token_id": 0}))
  (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(*get_tokenizer("byte").bpe()), ensure_ascii=False))
  (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": byte_to_unicode()[0]}))
  return model


def greedy_text(model, prompt: str, n: int) -> str:
  """The model's greedy continuation of `prompt`, as far as its bytes are whole UTF-8 characters."""
  ids = torch.tensor([list(prompt.encode())])
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
  for k in range(len(out), 0, -1):
    try:
      return bytes(out[:k]).decode()
    except UnicodeDecodeError:
      pass
  return ""


def write_tasks(folder, model) -> None:
  """Three tasks over one local JSON file: multiple choice (one choice per document is the model's own greedy
  continuation, so that greedy flags are exercised both ways; long choices pass the model's length), a whole
  text's rolling log-likelihood, and generation with stop sequences."""
  docs = []
  for i in range(6):
    # the first question whose greedy bytes start as text (a random model may begin a character's bytes midway)
    question, greedy = next((q, g) for q in (f"Q{i}: what follows {i}" + "?" * (j + 1) for j in range(20))
                            if (g := greedy_text(model, q, 3)))
    docs.append({"question": question, "choices": [greedy, f" {i + 1}",
                                                   " a long answer, past the length"],
                 "label": i % 3, "text": "The quick brown fox. " * (i + 1) + f"It jumps {i} times.",
                 "prompt": f"Count {i}:", "answer": f" {i + 1}"})
  folder.mkdir()
  (folder / "data.json").write_text(json.dumps(docs))
  common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data.json'}\ntest_split: test\n"
  (folder / "mc.yaml").write_text(
      "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ntarget_delimiter: ''\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  (folder / "rolling.yaml").write_text(
      "task: tiny_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
      "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
  (folder / "gen.yaml").write_text(
      "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
      "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.', 'q']\n  max_gen_toks: 12\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")


def converted(family: str, root):
  """The small Hugging Face model in root/hf, converted into root/ours, and the tasks in root/tasks."""
  from gptoss_jax.convert.__main__ import main as convert
  hf_model = small_hf_model(family, root / "hf")
  assert convert(["--src", str(root / "hf"), "--dst", str(root / "ours"), "--dtype", "float32"]) == 0
  write_tasks(root / "tasks", hf_model)


@pytest.fixture(scope="module", params=["gpt2", "gpt_oss"])
def harness_pair(request, tmp_path_factory):
  """(the harness's results with this codebase's model on the converted checkpoint, with its `hf` model on the
  Hugging Face folder, the task folder, the checkpoint)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  from gptoss_jax.lm_eval.model import HarnessModel
  root = tmp_path_factory.mktemp(request.param)
  converted(request.param, root)
  manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
  ours = lm_eval.simple_evaluate(model=HarnessModel(ckpt=str(root / "ours"), batch_size=4, max_length=MAX_LENGTH),
                                 tasks=list(TASKS), task_manager=manager, log_samples=True)
  theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32,"
                                   f"max_length={MAX_LENGTH}", tasks=list(TASKS), task_manager=manager,
                                   log_samples=True, batch_size=1, device="cpu")
  return ours, theirs, root / "tasks", root / "ours"


def _responses(results, task):
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_and_greedy_flags_equal_the_harness_hf_models(harness_pair):
  ours, theirs, _, _ = harness_pair
  a, b = _responses(ours, "tiny_mc"), _responses(theirs, "tiny_mc")
  flags = [x[0][1] for doc in a for x in doc]
  assert any(flags) and not all(flags)  # the greedy choice is greedy for both, the others are not
  for doc_a, doc_b in zip(a, b, strict=True):
    for (la, ga), (lb, gb) in ((x[0], y[0]) for x, y in zip(doc_a, doc_b, strict=True)):
      assert la == pytest.approx(lb, abs=1e-4) and ga == gb
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]


def test_rolling_loglikelihoods_equal_the_harness_hf_models(harness_pair):
  ours, theirs, _, _ = harness_pair
  a, b = _responses(ours, "tiny_rolling"), _responses(theirs, "tiny_rolling")
  np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-4, rtol=0)
  assert len(json.dumps(ours["samples"]["tiny_rolling"][-1]["doc"]["text"])) > MAX_LENGTH  # several windows
  assert ours["results"]["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(
      theirs["results"]["tiny_rolling"]["bits_per_byte,none"], rel=1e-6)


def test_greedy_generation_equals_the_harness_hf_models(harness_pair):
  ours, theirs, _, _ = harness_pair
  assert _responses(ours, "tiny_gen") == _responses(theirs, "tiny_gen")
  assert any(r[0][0] for r in _responses(ours, "tiny_gen"))  # something was generated before a stop
  assert ours["results"]["tiny_gen"]["exact_match,none"] == theirs["results"]["tiny_gen"]["exact_match,none"]


def test_requests_of_many_lengths_compile_a_few_programs(harness_pair):
  from gptoss_jax.lm_eval.model import HarnessModel, buckets
  _, _, _, ckpt = harness_pair
  model = HarnessModel(ckpt=str(ckpt), batch_size=2, max_length=MAX_LENGTH)
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(1, 256, n).tolist(), rng.integers(1, 256, 3).tolist()) for n in range(1, 60, 2)]
  scores = model.score_tokens(pairs)
  assert model._score._cache_size() <= len(buckets(MAX_LENGTH)) == 3  # 16, 32, 40 (30 lengths asked)
  one = [model.score_tokens([p])[0] for p in pairs[::7]]  # alone, in a batch of padding, another bucket maybe
  np.testing.assert_allclose([s[0] for s in one], [s[0] for s in scores[::7]], atol=1e-4)


def test_the_command_prints_the_harness_table_and_writes_its_json(tmp_path):
  """The command on the gpt2-family checkpoint: the harness's table, its JSON with the accuracy the harness's
  own model gets (the same requests as above), and bad input as one line."""
  import lm_eval
  converted("gpt2", tmp_path)
  tasks, ckpt = tmp_path / "tasks", tmp_path / "ours"
  theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,"
                                   f"max_length={MAX_LENGTH}", tasks=["tiny_mc"], batch_size=1, device="cpu",
                                   task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks), include_defaults=False))
  from gptoss_jax.lm_eval.__main__ import main
  out = run_command(main, "--ckpt", ckpt, "--tasks", "tiny_mc", "--include-path", tasks, "--max-length", MAX_LENGTH,
                    "--output", tmp_path / "results.json")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "|tiny_mc|" in out.stdout.replace(" ", "") and "acc" in out.stdout
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
  offline = tmp_path / "offline"  # a checkpoint whose tokenizer's vocabulary cannot be had: nothing to encode or decode
  shutil.copytree(ckpt, offline)
  config = json.loads((offline / "config.json").read_text())
  config["data"] |= {"tokenizer": "gpt2", "vocab_file": str(tmp_path / "missing.tiktoken")}
  (offline / "config.json").write_text(json.dumps(config))
  for args, message in ((["--tasks", "no_such_task"], "unknown task(s): no_such_task"),
                        (["--tasks", "tiny_mc", "--ckpt", str(tmp_path / "missing")], "not a checkpoint folder"),
                        (["--tasks", "tiny_gen", "--ckpt", str(offline)], "cannot load the gpt2 vocabulary")):
    out = run_command(main, "--ckpt", ckpt, "--include-path", tasks, *args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_sweeps_compared_trainings_are_scored_once_per_task(tmp_path):
  """experiments.harness on a sweep folder: each compared training's checkpoint scored into its harness.json
  (the harness's accuracy, its standard error, which way is better), nothing scored twice, refused at tiny."""
  import dataclasses
  from flax import nnx
  from experiments import harness
  from experiments.description import RunSpec, SweepDescription
  from gptoss_jax.config import ConfigError, DataConfig, ModelConfig, RunConfig
  from gptoss_jax.model import Transformer
  from gptoss_jax.weights import save_model
  cfg = ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32, max_seq_len=64)
  save_model(tmp_path / "sweep" / "run" / "seed0", RunConfig(model=cfg, data=DataConfig(tokenizer="byte", seq_len=32)),
             Transformer(cfg, nnx.Rngs(0)))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "data.json").write_text(json.dumps(
      [{"q": f"{i} plus one is", "choices": [f" {i + 1}", f" {i + 2}"], "label": 0} for i in range(4)]))
  (tmp_path / "tasks" / "mc.yaml").write_text(
      f"task: sweep_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tasks' / 'data.json'}\n"
      "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
      "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
  description = SweepDescription("x", "small", (RunSpec("run", steps=1),), seeds=1)
  assert harness.run(tmp_path / "sweep", description, ["sweep_mc"], include_path=str(tmp_path / "tasks")) == 1
  scores = json.loads((tmp_path / "sweep" / "run" / "seed0" / "harness.json").read_text())["sweep_mc"]
  assert scores["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0) and "acc_stderr" in scores
  assert scores["higher_is_better"] == {"acc": True}
  assert harness.run(tmp_path / "sweep", description, ["sweep_mc"], include_path=str(tmp_path / "tasks")) == 0
  with pytest.raises(ConfigError, match="no harness scores at tiny scale"):
    harness.run(tmp_path / "sweep", dataclasses.replace(description, scale="tiny"), ["sweep_mc"])
