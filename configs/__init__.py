"""Presets: one file per family, each get_config(preset) -> ml_collections ConfigDict (`--config gpt_oss:tiny`).
Installed as `gptoss_jax.configs`; gptoss_jax.config_files finds these files there and loads them as it loads
any config file, by path."""
