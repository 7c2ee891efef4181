"""Run configuration besides the model: data, optimization, mesh, checkpoints, logging.

Config files return `run_config(model_fields)`; every field can be overridden on the command line as
--config.<section>.<field>=<value>.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections


def run_config(model: Mapping) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "model": dict(model),
      "data": {
          "source": "shakespeare",  # shakespeare | text | hf
          "path": "",  # text: glob(s); hf: name[:config]
          "tokenizer": "byte",  # byte | gpt2 | o200k_harmony
          "vocab_file": "",  # local .tiktoken file for offline use
          "dir": "",  # prepared dataset; "" = <cache>/data/<source>-<tokenizer>
          "seq_len": 128,
          "eval_fraction": 0.01,
          "hf_split": "train",
          "hf_field": "text",
      },
      "train": {
          "steps": 1000,
          "stop_at": 0,  # stop (with a checkpoint) at this step; 0 = run to `steps`
          "batch_size": 16,  # global, in sequences
          "microbatches": 1,  # gradient accumulation
          "seed": 0,
          "lr": 3e-3,
          "warmup_steps": 100,
          "schedule": "cosine",  # cosine | linear | constant
          "min_lr_ratio": 0.1,
          "weight_decay": 0.1,
          "decay_norms": False,
          "decay_biases": False,
          "decay_embeddings": True,
          "b1": 0.9,
          "b2": 0.95,
          "eps": 1e-8,
          "clip_norm": 1.0,
          "remat": False,
          "eval_every": 100,
          "eval_batches": 8,  # held-out batches per evaluation; 0 = the whole held-out split
      },
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1},
      "checkpoint": {"every": 250, "keep": 3, "async_save": True},
      "log": {
          "every": 10,
          "peak_flops": 0.0,  # per device; 0 = known accelerators' bf16 peak, or measured on CPU
          "progress": True,
      },
      "distributed": {"coordinator": "", "num_processes": 1, "process_id": 0},
  })
