import glob
import os

import pytest

from conftest import REPO
from gptoss_jax.config import ConfigError, ModelConfig, RunConfig
from gptoss_jax.config_files import apply_overrides, load_config_file, model_config_from_file, parse_override_args, run_config_from_args


@pytest.mark.parametrize("fields, field_named", [
    (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(n_experts=4, top_k=5, d_expert=8), "top_k"),
    (dict(n_experts=4, top_k=2, d_expert=0), "d_expert"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(sliding_window=4, window_layers="0,9"), "window_layers"),
    (dict(sliding_window=4, window_layers="odd"), "window_layers"),
    (dict(norm="batchnorm"), "norm"),
    (dict(position="alibi"), "position"),
    (dict(ffn="relu"), "ffn"),
    (dict(routing="random"), "routing"),
    (dict(moe_dispatch="magic"), "moe_dispatch"),
    (dict(resid_dropout=1.5), "resid_dropout"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers="2"), "n_layers"),
    (dict(qk_norm=1), "qk_norm"),
    (dict(head_dim=15), "head_dim"),
    (dict(moe_mxfp4=True), "moe_mxfp4"),
    (dict(dtype="float8"), "dtype"),
])
def test_bad_values_name_the_field(fields, field_named):
  with pytest.raises(ConfigError, match=field_named):
    ModelConfig(**fields)


def test_unknown_field_is_named():
  with pytest.raises(ConfigError, match="n_layer_typo"):
    ModelConfig.from_dict({"n_layer_typo": 3})


def test_window_layers_patterns():
  assert ModelConfig(n_layers=4, sliding_window=8).sliding_layers == (True, False, True, False)
  assert ModelConfig(n_layers=3, sliding_window=8, window_layers="all").sliding_layers == (True,) * 3
  assert ModelConfig(n_layers=4, sliding_window=8, window_layers="1,3").sliding_layers == (False, True, False, True)
  assert ModelConfig(n_layers=4, sliding_window=0).sliding_layers == (False,) * 4


def test_ints_are_accepted_for_floats():
  assert ModelConfig(rope_theta=10000).rope_theta == 10000.0


# the released models' parameter counts (transformers' num_parameters() of each, as their model cards give them)
PUBLISHED_PARAMS = {"gpt2:124m": 124_439_808, "gpt2:355m": 354_823_168, "gpt2:774m": 774_030_080,
                    "gpt2:1.5b": 1_557_611_200, "gpt_oss:20b": 20_914_757_184, "gpt_oss:120b": 116_829_156_672,
                    "llama:8b": 8_030_261_248, "qwen3:8b": 8_190_735_360, "qwen3:30b-a3b": 30_532_122_624}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "[!_]*.py"))))
def test_every_preset_builds_and_the_released_ones_have_their_published_parameter_counts(path):
  """Each preset is a whole valid run config whose model builds (abstractly: no array is allocated); a preset
  of a released model has exactly its published number of parameters."""
  import jax
  from flax import nnx
  from gptoss_jax.model import Transformer
  module = {}
  exec(open(path).read(), module)
  family = os.path.basename(path)[:-3]
  for name in module["PRESETS"]:
    cfg = RunConfig.from_dict(load_config_file(f"{path}:{name}")).model
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert count == PUBLISHED_PARAMS.get(f"{family}:{name}", count), (family, name, count)
  assert any(key.startswith(family + ":") for key in PUBLISHED_PARAMS)


def test_overrides_are_typed():
  config = load_config_file(os.path.join(REPO, "configs/gpt_oss.py:tiny"))
  apply_overrides(config, parse_override_args(["--config.model.n_layers=6", "--config.model.qk_norm=true",
                                               "--config.model.rope_theta=5e4", "--config.model.norm=layernorm"]))
  cfg = ModelConfig.from_dict(config.model)
  assert (cfg.n_layers, cfg.qk_norm, cfg.rope_theta, cfg.norm) == (6, True, 5e4, "layernorm")


@pytest.mark.parametrize("args, message", [
    (["--config.model.n_layerz=3"], "unknown config key: model.n_layerz"),
    (["--config.model.n_layers=three"], "model.n_layers"),
    (["--config.model.qk_norm=maybe"], "model.qk_norm"),
    (["--n_layers=3"], "unrecognized argument"),
])
def test_bad_overrides(args, message):
  config = load_config_file(os.path.join(REPO, "configs/gpt2.py:tiny"))
  with pytest.raises(ConfigError, match=message):
    apply_overrides(config, parse_override_args(args))


def test_unknown_preset_lists_presets():
  with pytest.raises(ConfigError, match="124m"):
    load_config_file(os.path.join(REPO, "configs/gpt2.py:huge"))


def test_presets_and_commands_work_from_any_directory(tmp_path):
  """After `pip install -e .`: presets by name, and the training, sweep and report commands, from a folder
  that is not the repository and has a `configs/` package of its own (which the presets must not be taken
  from)."""
  import json
  import subprocess
  import sys
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "__init__.py").write_text("FILES = {}\n")
  (tmp_path / "configs" / "gpt_oss.py").write_text("def get_config(arg):\n  raise RuntimeError('the user\\'s own')\n")
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True)
  out = run("gptoss_jax.inspect", "--config", "gpt_oss:20b", "--json")
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["total_params"] == 20_914_757_184
  out = run("experiments.run", "experts", "--dry-run")
  assert out.returncode == 0 and "e16_k4" in out.stdout, out.stderr
  out = run("experiments.report", str(tmp_path))
  assert out.returncode == 2 and "not a sweep folder" in out.stderr
  out = run("gptoss_jax.train", "--config", "gpt_os:tiny", "--workdir", str(tmp_path / "w"))
  assert out.returncode == 2 and "gpt_oss" in out.stderr and len(out.stderr.strip().splitlines()) == 1
  out = run("gptoss_jax.train", "--config", "gpt_oss:tiny", "--workdir", str(tmp_path / "w"), "--config.train.stepz=1")
  assert out.returncode == 2 and out.stderr.startswith("error: unknown config key: train.stepz (did you mean train.steps")
  assert load_config_file("qwen3:tiny-moe").model.n_experts > 0


def test_every_model_field_is_compared_at_export_or_marked():
  """A field is either marked SAME_MATH next to it (it does not change what a trained model computes), or
  the export's architecture check compares it (ModelConfig.computation) in some configuration."""
  import dataclasses
  configs = [model_config_from_file(spec) for spec in ("gpt2:tiny", "gpt_oss:tiny", "qwen3:tiny-moe", "llama:tiny")]
  configs.append(configs[-1].replace(position="llama3", rope_factor=8.0))
  compared = set().union(*(c.computation() for c in configs))
  for f in dataclasses.fields(ModelConfig):
    assert f.metadata.get("same_math") or f.name in compared, f"{f.name}: neither compared at export nor marked"
  base = configs[1]
  assert base.computation() == base.replace(dtype="bfloat16", moe_dispatch="dense", attn_impl="masked").computation()
  assert base.computation() != base.replace(swiglu_limit=5.0).computation()
  assert base.computation() != base.replace(moe_bias_update_rate=1e-3).computation()  # a learned routing bias


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps must be > 0, got 0"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.schedule=step", "train.schedule must be one of cosine|linear|constant"),
    ("train.microbatches=3", "train.batch_size 16 does not divide into 3 microbatches"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1]"),
    ("train.eval_batches=-1", "train.eval_batches must be >= 0"),
    ("data.source=web", "data.source must be one of shakespeare|text|hf"),
    ("data.tokenizer=bpe", "data.tokenizer must be one of byte|gpt2|o200k_harmony"),
    ("data.val_fraction=0.7", "data.val_fraction must be in (0, 0.5)"),
    ("data.hf_split=train[:2%]", "data.hf_split must be a split name"),
    ("data.seq_len=1000", "data.seq_len must be in 1..model.max_seq_len (256)"),
    ("mesh.tensor=0", "mesh: sizes must be >= 1"),
    ("checkpoint.keep=0", "checkpoint.keep must be > 0"),
    ("log.every=0", "log.every must be > 0"),
    ("distributed.process_id=3", "distributed.process_id must be in 0..0"),
    ("model.n_kv_heads=3", "n_heads (4) must be divisible by n_kv_heads (3)"),
])
def test_every_run_config_value_is_checked_where_it_is_built(override, message):
  with pytest.raises(ConfigError) as e:
    run_config_from_args("gpt_oss:tiny", [f"--config.{override}"])
  assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_take_the_space_form_and_suggest_the_nearest_key():
  config = run_config_from_args("gpt_oss:tiny", ["--config.train.steps", "5", "--config.model.n_layers=2",
                                                  "--config.data.tokenizer", "gpt2"])
  assert (config.train.steps, config.model.n_layers, config.data.tokenizer) == (5, 2, "gpt2")
  with pytest.raises(ConfigError, match=r"unknown config key: train\.stepz \(did you mean train\.steps"):
    run_config_from_args("gpt_oss:tiny", ["--config.train.stepz", "5"])
  with pytest.raises(ConfigError, match=r"unknown config key: trian \(did you mean train\?\)"):
    RunConfig.from_dict({"trian": {}})
  with pytest.raises(ConfigError, match="unrecognized argument: --steps"):
    run_config_from_args("gpt_oss:tiny", ["--steps", "5"])
