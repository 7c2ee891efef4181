"""gpt-oss (2025): RMSNorm, RoPE + YaRN, GQA with biases and sinks, sliding window on alternate
layers, MoE of clamped-SwiGLU experts (top-k then softmax), untied embeddings."""

from gptoss_jax.config_files import preset_config

BASE = dict(vocab_size=201088, max_seq_len=131072, d_model=2880, n_heads=64, n_kv_heads=8, head_dim=64,
            norm="rmsnorm", norm_eps=1e-5, position="yarn", rope_theta=150000.0, rope_factor=32.0,
            rope_original_max_len=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_truncate=False,
            ffn="clamped_swiglu", ffn_bias=True, swiglu_limit=7.0, swiglu_alpha=1.702,
            qkv_bias=True, out_bias=True, attn_sinks=True, sliding_window=128, window_layers="alternate",
            n_experts=32, top_k=4, d_expert=2880, d_ff=2880, router_bias=True, routing="topk_softmax",
            tie_embeddings=False)

PRESETS = {
    "20b": BASE | dict(n_layers=24, n_experts=32),
    "120b": BASE | dict(n_layers=36, n_experts=128),
    # trains on a laptop CPU: byte-level vocabulary, every gpt-oss switch kept
    "tiny": BASE | dict(vocab_size=256, max_seq_len=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=16, n_experts=8, top_k=2, d_expert=64, d_ff=64, sliding_window=32),
}


def get_config(preset: str = "20b"):
  return preset_config(PRESETS, preset)
