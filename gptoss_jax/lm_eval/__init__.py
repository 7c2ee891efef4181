"""This codebase's models under EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra).

`python -m gptoss_jax.lm_eval --ckpt DIR --tasks hellaswag,arc_easy` runs the harness's own evaluator on a
checkpoint (a training run or a conversion); importing `gptoss_jax.lm_eval.model` registers the model as
"gptoss_jax" for the harness's Python API (`lm_eval.simple_evaluate(model="gptoss_jax",
model_args="ckpt=DIR", ...)`). Nothing of the harness is imported by `gptoss_jax` itself.
"""
