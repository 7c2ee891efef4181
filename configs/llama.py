"""Llama 3: RMSNorm, RoPE with llama3 frequency scaling, GQA without biases, SwiGLU."""

from gptoss_jax.config_files import preset_config

BASE = dict(vocab_size=128256, max_seq_len=131072, head_dim=128, norm="rmsnorm", norm_eps=1e-5,
            position="llama3", rope_theta=500000.0, rope_factor=8.0, rope_original_max_len=8192,
            llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0, ffn="swiglu", tie_embeddings=False)

PRESETS = {
    "8b": BASE | dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "tiny": BASE | dict(vocab_size=256, max_seq_len=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=16, d_ff=192),
}


def get_config(preset: str = "8b"):
  return preset_config(PRESETS, preset)
