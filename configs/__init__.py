"""Presets: one file per family, each get_config(preset) -> ml_collections ConfigDict (`--config gpt_oss:tiny`).
FILES is the registry `gptoss_jax.config_files` finds them in by name."""

from configs import gpt2, gpt_oss, llama, qwen3

FILES = {"gpt2": gpt2, "gpt_oss": gpt_oss, "llama": llama, "qwen3": qwen3}
