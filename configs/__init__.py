"""Presets: one file per family, each get_config(preset) -> ml_collections ConfigDict (`--config gpt_oss:tiny`)."""
