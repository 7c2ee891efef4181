"""Config files, presets by name and command-line overrides: the only module that knows ml_collections.

A config file is a Python file with get_config(arg) returning an ml_collections ConfigDict of the whole run
config (model, data, train, ...; the ecosystem's convention), or a saved run config (.json). Presets are
named `family:preset` (`gpt_oss:tiny`): the files of the installed `gptoss_jax.configs` (the repository's configs/).
Overrides come from the command line as `--config.model.n_layers=12` and are typed by the value they
replace. Everything ends as a typed, validated RunConfig (gptoss_jax.config).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from gptoss_jax.config import ConfigError, ModelConfig, RunConfig, nearest


def run_config(model: Mapping) -> ml_collections.ConfigDict:
  """The whole run config as config files give it (ml_collections, the ecosystem's convention): the
  model's fields and every other section at its defaults. The command line's overrides are applied to
  it, then it becomes a RunConfig, once."""
  return ml_collections.ConfigDict(RunConfig(model=ModelConfig.from_dict(model)).to_dict())


def preset_config(presets: Mapping[str, dict], name: str) -> ml_collections.ConfigDict:
  """A config file's get_config(): the run config (model, data, train, ...) for a named preset."""
  if name not in presets:
    raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(presets)})")
  return run_config(ModelConfig(**presets[name]).to_dict())


def preset_files() -> dict[str, Path]:
  """The preset files by family name: gptoss_jax.configs where it is installed (the repository's configs/),
  else the configs/ beside the gptoss_jax package (a source tree used without installing)."""
  spec = importlib.util.find_spec("gptoss_jax.configs")
  folder = (Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations
            else Path(__file__).resolve().parents[1] / "configs")
  return {p.stem: p for p in sorted(folder.glob("*.py")) if p.stem != "__init__"}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]`, a saved run config (`.json`), or a preset file by name (`gpt_oss:tiny`,
  preset_files()), by calling its get_config(arg)."""
  path, _, arg = spec.partition(":")
  file = Path(path)
  if file.suffix == ".json" and file.is_file():  # a saved run config (run.json, a run's config.json)
    return ml_collections.ConfigDict(json.loads(file.read_text()))
  if not file.is_file():
    presets = preset_files()
    if path not in presets:
      raise ConfigError(f"config file not found: {path} (a .py file, or a preset file by name: "
                        f"{', '.join(sorted(presets))})")
    file = presets[path]
  module_spec = importlib.util.spec_from_file_location(f"_gptoss_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not isinstance(getattr(module, "get_config", None), types.FunctionType):
    raise ConfigError(f"{path} has no get_config() function")
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, str]) -> None:
  """Applies {"model.n_layers": "12", ...} (strings from the command line) in place, typed by the
  current value; an unknown key or a value of the wrong type raises ConfigError naming it."""
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise ConfigError(f"unknown config key: {key}{nearest(key, _keys(config))}")
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"unknown config key: {key}{nearest(key, _keys(config))}")
    node[leaf] = _parse_like(node[leaf], text, key)


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out += _keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
  return out


def _parse_like(current: Any, text: str, key: str) -> Any:
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str) or current is None:
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      return type(current)(value if isinstance(value, (tuple, list)) else (value,))
  except (ValueError, SyntaxError):
    raise ConfigError(f"{key}: cannot read {text!r} as {type(current).__name__}") from None
  raise ConfigError(f"{key}: cannot override a value of type {type(current).__name__}")


def model_config_from_file(spec: str, overrides: Mapping[str, str] | None = None) -> ModelConfig:
  config = load_config_file(spec)
  apply_overrides(config, overrides or {})
  return ModelConfig.from_dict(config.model)


def parse_override_args(args: list[str]) -> dict[str, str]:
  """['--config.model.n_layers=12', '--config.train.steps', '5', ...] -> {'model.n_layers': '12',
  'train.steps': '5'}: the `=` form and the space form."""
  overrides, args = {}, list(args)
  while args:
    arg = args.pop(0)
    key, eq, value = arg.partition("=")
    if key.startswith("--config.") and not eq and args and not args[0].startswith("--"):
      value, eq = args.pop(0), "="
    if not key.startswith("--config.") or not eq:
      raise ConfigError(f"unrecognized argument: {arg} (overrides look like --config.model.n_layers=12 "
                        "or --config.model.n_layers 12)")
    overrides[key.removeprefix("--config.")] = value
  return overrides


def overridden(config: RunConfig, overrides: Mapping[str, str]) -> RunConfig:
  """A typed config with command-line overrides ({"model.position": "yarn", ...}) applied, validated again."""
  tree = ml_collections.ConfigDict(config.to_dict())
  apply_overrides(tree, overrides)
  return RunConfig.from_dict(tree)


def run_config_from_args(spec: str, args: list[str]) -> RunConfig:
  """The command line's boundary: a config file (or preset name) and its overrides -> a RunConfig."""
  config = load_config_file(spec)
  apply_overrides(config, parse_override_args(args))
  return RunConfig.from_dict(config)
