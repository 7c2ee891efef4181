"""GPT-2 (2019): LayerNorm, learned positions, tanh-GELU MLP, biases everywhere, tied embeddings, dropout."""

from gptoss_jax.config_files import preset_config

BASE = dict(vocab_size=50257, max_seq_len=1024, head_dim=64, norm="layernorm", norm_eps=1e-5,
            position="learned", ffn="gelu", ffn_bias=True, qkv_bias=True, out_bias=True,
            tie_embeddings=True, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)


def _size(d: int, layers: int, heads: int) -> dict:
  return BASE | dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads, d_ff=4 * d)


PRESETS = {
    "124m": _size(768, 12, 12),
    "355m": _size(1024, 24, 16),
    "774m": _size(1280, 36, 20),
    "1.5b": _size(1600, 48, 25),
    "tiny": _size(64, 2, 4) | dict(vocab_size=256, max_seq_len=256, head_dim=16),
}


def get_config(preset: str = "124m"):
  return preset_config(PRESETS, preset)
