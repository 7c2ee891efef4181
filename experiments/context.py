"""python -m experiments.context FOLDER [FOLDER ...]

The `context` sweep's evaluation of a trained model past its training length T, on its test split: the
loss and loss by position at 1x, 2x, 4x and 8x T (non-overlapping windows); for a rotary model, the same at
2x-8x with YaRN switched on at evaluation (factor = the multiple, from T); and streamed over windows of
8x T through a KV cache of T positions in every layer. Written to FOLDER/evaluation.json. FOLDER is a
training, or a sweep folder (every compared training in it without the file). The sweep runner calls it
after each compared training of the `context` sweep. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.description import SweepDescription
from experiments.paired import ALPHA, compare, corrected
from gptoss_jax.config import ConfigError
from gptoss_jax.fileio import atomic_write

MULTIPLES = (1, 2, 4, 8)
BATCH_TOKENS = 16384  # tokens per evaluation call (tiny models: fewer, larger calls)


def measure(folder: Path, multiples: tuple[int, ...] = MULTIPLES) -> dict:
  """{"seq_len": T, "plain": {length: result}, "yarn": {length: result}, "stream": result}, each result
  `evaluate_tokens`' (loss, by_position, ...)."""
  from gptoss_jax.data.pipeline import split_tokens
  from gptoss_jax.data.prepare import dataset_dir
  from gptoss_jax.data.tokenizers import get_tokenizer
  from gptoss_jax.evaluate import check_length, evaluate_tokens, token_byte_lengths
  from gptoss_jax.weights import load_model
  config, cfg, model = load_model(folder)
  T = config.data.seq_len
  lengths = [k * T for k in multiples]
  for n in lengths:
    check_length(cfg, n)
  tokens = split_tokens(dataset_dir(config.data), "test")
  byte_lengths = token_byte_lengths(get_tokenizer(config.data.tokenizer, config.data.vocab_file))

  def evaluate(m, n: int, cache: int = 0) -> dict:
    return evaluate_tokens(m, tokens, n, max(1, BATCH_TOKENS // n), byte_lengths, progress=False, stream_cache=cache)

  out = {"seq_len": T, "plain": {str(n): evaluate(model, n) for n in lengths}, "yarn": {},
         "stream": evaluate(model, lengths[-1], cache=T)}
  if cfg.position == "rope":
    for k, n in zip(multiples, lengths):
      if k > 1:
        yarn = {"model.position": "yarn", "model.rope_factor": str(float(k)), "model.rope_original_max_len": str(T)}
        out["yarn"][str(n)] = evaluate(load_model(folder, overrides=yarn)[2], n)
  return out


def load(sweep_dir: Path, description: SweepDescription) -> dict[str, dict[int, dict]]:
  """run -> compared seed -> its evaluation.json, for the runs that have any."""
  out = {}
  for spec in description.runs:
    found = {int(p.parent.name[4:]): json.loads(p.read_text())
             for p in (sweep_dir / spec.name).glob("seed*/evaluation.json") if p.parent.name[4:].isdigit()}
    if found:
      out[spec.name] = dict(sorted(found.items()))
  return out


def _measures(evals: dict[int, dict]) -> dict[str, float]:
  """One seed's losses by measure: 'N' (windows of N), 'YaRN N', 'streamed'."""
  return ({n: r["loss"] for n, r in evals["plain"].items()} | {f"YaRN {n}": r["loss"] for n, r in evals["yarn"].items()}
          | {"streamed": evals["stream"]["loss"]})


def families(runs) -> dict[str, int]:
  """comparisons()' two Holm families and their tests, from the sweep's runs (each with a baseline: every
  length and streamed; each rotary run: YaRN at every length past the training one)."""
  compared = sum(1 for r in runs if r.baseline)
  rotary = sum(1 for r in runs if r.model.position == "rope")
  return {f"context: against the baseline at {len(MULTIPLES)} lengths and streamed": compared * (len(MULTIPLES) + 1),
          "context: YaRN against none, each longer length": rotary * (len(MULTIPLES) - 1)}


def comparisons(evaluations: dict[str, dict[int, dict]], description: SweepDescription):
  """(each run against its baseline at every length and streamed: one Holm family; each rotary run's YaRN
  against itself without YaRN at every longer length: another), corrected."""
  baseline = {r.name: r.baseline for r in description.runs}
  measures = {run: {s: _measures(e) for s, e in seeds.items()} for run, seeds in evaluations.items()}
  between, yarn = [], []
  for run, seeds in measures.items():
    base = measures.get(baseline.get(run, ""), {})
    common = sorted(set(seeds) & set(base))
    if len(common) > 1:
      for m in [m for m in seeds[common[0]] if not m.startswith("YaRN")]:
        d = np.array([seeds[s][m] - base[s][m] for s in common])
        between.append((m, compare(run, baseline[run], d)))
    for m in [m for m in next(iter(seeds.values())) if m.startswith("YaRN")]:
      plain = m.removeprefix("YaRN ")
      d = np.array([seeds[s][m] - seeds[s][plain] for s in seeds])
      if len(d) > 1:
        yarn.append((m, compare(run, run, d)))
  fix = lambda family: list(zip([m for m, _ in family], corrected([c for _, c in family])))
  return fix(between), fix(yarn)


def past_length(sweep_dir: Path, description: SweepDescription):
  """comparisons() of the sweep's evaluations, or None for a sweep without them."""
  evaluations = load(sweep_dir, description)
  return comparisons(evaluations, description) if evaluations else None


def section(sweep_dir: Path, description: SweepDescription) -> list[str]:
  """The report's section for a sweep whose trainings carry evaluation.json (the `context` sweep)."""
  evaluations = load(sweep_dir, description)
  if not evaluations:
    return []
  first = next(iter(next(iter(evaluations.values())).values()))
  T, cache = first["seq_len"], first["stream"]["stream_cache"]
  columns = list(_measures(first))
  lines = ["", "## Past the training length", "",
           f"Test loss (nats/token, mean ± sd over compared seeds) in non-overlapping windows of each length (trained at "
           f"{T}); `YaRN N`: the same rotary model with YaRN switched on at evaluation (factor N / {T}, from {T}); "
           f"`streamed`: windows of {first['stream']['seq_len']} read through a KV cache of the last {cache} positions "
           "in every layer (`python -m gptoss_jax.evaluate --stream --cache`). Written by `experiments.context`.", "",
           "| run | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
  for run, seeds in evaluations.items():
    values = [_measures(e) for e in seeds.values()]
    cells = [f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else (f"{v[0]:.4f}" if v else "-")
             for v in ([x[c] for x in values if c in x] for c in columns)]
    lines.append(f"| {run} | {len(seeds)} | " + " | ".join(cells) + " |")
  between, yarn = comparisons(evaluations, description)
  header = ("| run | vs | measure | n | Δ | 95% CI | p (t) | p (sign-flip) | Holm p (t) | Holm p (sign-flip) | "
            "simultaneous CI | verdict |")
  lines += ["", f"Each run against its baseline, seed by seed, at every length and streamed: one family of {len(between)} "
            f"tests, Holm over both tests, simultaneous intervals at 1 - {ALPHA:g} / {len(between)}; distinguishable only "
            "where both corrected tests reject (as in the comparisons above).", "", header, "|---" * 12 + "|"]
  lines += [f"| {c.run} | {c.baseline} | {m} | {c.cells()}" for m, c in between]
  if yarn:
    lines += ["", f"YaRN at evaluation against the same model without it, same seeds and windows (Δ = YaRN - plain; "
              f"a family of {len(yarn)}):", "", header, "|---" * 12 + "|"]
    lines += [f"| {c.run} | {c.run} without YaRN | {m.removeprefix('YaRN ')} | {c.cells()}" for m, c in yarn]
  return lines + ["", "![loss by position past the training length](loss_by_position.png)"]


def plot(sweep_dir: Path, description: SweepDescription, out: Path) -> list[Path]:
  """loss_by_position.png: mean over seeds of the loss in each position bucket, one line per run; panels: the
  longest plain windows, the same with YaRN, streamed."""
  evaluations = load(sweep_dir, description)
  if not evaluations:
    return []
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from gptoss_jax.evaluate import bucket_axis
  first = next(iter(next(iter(evaluations.values())).values()))
  longest = max(first["plain"], key=int)
  panels = [("plain", f"windows of {longest}"), ("yarn", f"windows of {longest}, YaRN at evaluation"),
            ("stream", f"streamed, cache of {first['stream']['stream_cache']}")]
  colors = dict(zip(evaluations, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))  # one per run, in every panel
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
  for ax, (kind, title) in zip(axes, panels):
    for run, seeds in evaluations.items():
      results = [e[kind] if kind == "stream" else e[kind].get(longest) for e in seeds.values()]
      if not all(results):
        continue
      mean = np.mean([[b["loss"] for b in r["by_position"]] for r in results], axis=0)
      ax.plot(bucket_axis(ax, results[0]["by_position"]), mean, marker="o", label=run, color=colors[run])
    ax.axvline(first["seq_len"], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="position (bucket start; dotted: the training length)", title=title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test loss (nats/token)")
  axes[0].legend()
  fig.suptitle(f"{description.sweep} ({description.scale}): loss by position, mean over seeds")
  fig.tight_layout()
  path = out / "loss_by_position.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def folders(path: Path) -> list[Path]:
  """A training folder, or a sweep folder's compared trainings that lack the file."""
  if (path / "sweep.json").is_file():
    return sorted(p for p in path.glob("*/seed*") if (p / "checkpoints").is_dir() and not (p / "evaluation.json").is_file())
  if not (path / "config.json").is_file():
    raise ConfigError(f"{path} is neither a training folder nor a sweep folder")
  return [path]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.context", description=__doc__.split("\n\n")[0])
  parser.add_argument("folders", nargs="+", help="training or sweep folders")
  args = parser.parse_args(argv)
  try:
    todo = [f for path in args.folders for f in folders(Path(path))]
    for folder in todo:
      result = measure(folder)
      atomic_write(folder / "evaluation.json", json.dumps(result))
      print(f"{folder}: " + ", ".join(f"{n}: {r['loss']:.4f}" for n, r in result["plain"].items())
            + f"; streamed {result['stream']['loss']:.4f}", file=sys.stderr)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()
  sys.exit(main())
