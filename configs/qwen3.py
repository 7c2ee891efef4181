"""Qwen3: RMSNorm, RoPE, GQA with per-head q/k RMSNorm and no biases; dense SwiGLU or MoE
(softmax over all experts, then top-k, renormalized)."""

from gptoss_jax.config_files import preset_config

BASE = dict(vocab_size=151936, max_seq_len=40960, head_dim=128, norm="rmsnorm", norm_eps=1e-6,
            position="rope", rope_theta=1000000.0, ffn="swiglu", qk_norm=True, tie_embeddings=False)
MOE = dict(routing="softmax_topk", norm_topk_prob=True)

PRESETS = {
    "30b-a3b": BASE | MOE | dict(d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, d_ff=6144,
                                 n_experts=128, top_k=8, d_expert=768),
    "8b": BASE | dict(d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=12288),
    "tiny-moe": BASE | MOE | dict(vocab_size=256, max_seq_len=256, d_model=64, n_layers=4, n_heads=4,
                                  n_kv_heads=2, head_dim=16, d_ff=128, n_experts=16, top_k=4, d_expert=32),
    "tiny": BASE | dict(vocab_size=256, max_seq_len=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=16, d_ff=192),
}


def get_config(preset: str = "30b-a3b"):
  return preset_config(PRESETS, preset)
