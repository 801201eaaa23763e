"""A study's tables, plot and verdicts from its stored per-(cell, seed) results (`study.collect`).

Pure functions of those results, so a report can be rewritten without training anything:
- per exit: each exit's dev metric, mean +- std over seeds (std: the sample standard deviation, n-1);
- at a speed-up: for each layer ratio r of `StudyConfig.ratios`, the best sweep setting whose layer ratio
  is at least r (no interpolation: `frontier`), per seed, then mean +- std;
- training cost: wall-clock seconds per run (loading, compiling, the final dev evaluation and the export
  included), mean over seeds;
- a plot of the metric against the layer ratio, per cell, with a +-1 std band, and each cell's timed
  setting marked at its measured throughput speed-up;
- claims: the paper's claims checked on these numbers with a two-standard-error rule (`compare`);
- recipe: candidates ranked on the held-out TRAIN rows only, the chosen one then shown on dev.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rome_flax.io import files
from rome_flax.report import new_axes, save_plot

RATIO_GRID = np.round(np.arange(1.0, 6.0001, 0.05), 2)


def finite(values: Sequence[float]) -> np.ndarray:
  return np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1) of the finite values; std 0 for one value."""
  v = finite(values)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 1) -> str:
  """'mean ± std' over the finite values ('mean' for one; '(k of n)' when some were not finite)."""
  m, s = mean_std(values)
  if math.isnan(m):
    return "-"
  n, total = finite(values).size, len(values)
  text = f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"
  return text + (f" ({n} of {total})" if n < total else "")


def frontier_row(settings: Sequence[dict], metric: str, ratio: float) -> Optional[dict]:
  """The setting with the best metric among those whose layer ratio is at least `ratio` (None: none reaches it)."""
  reached = [r for r in settings if r["layer_ratio"] >= ratio - 1e-9 and not math.isnan(r[metric])]
  return max(reached, key=lambda r: r[metric]) if reached else None


def frontier(settings: Sequence[dict], metric: str, ratio: float) -> float:
  """The best metric among settings whose layer ratio is at least `ratio` (NaN when none reaches it)."""
  row = frontier_row(settings, metric, ratio)
  return float("nan") if row is None else row[metric]


def exit_values(result: dict, split: str = "dev", metric: Optional[str] = None) -> list[float]:
  rec = result[split]
  return [row[metric or rec["metric"]] for row in rec["per_exit"]]


def _metric(results: dict) -> str:
  return next(iter(results.values()))[0]["dev"]["metric"]


def _label(study, name: str) -> str:
  return study.cell(name).label


# ----------------------------------------------------------------------------- tables


def per_exit_table(study, results: dict, split: str = "dev") -> str:
  first = next(iter(results.values()))[0][split]
  num_exits = len(first["per_exit"])
  metrics = [first["metric"]] + [m for m in first["metric_names"] if m != first["metric"] and m != "mse"]
  head = ["cell", "seeds"] + [f"exit {e + 1}" + (" (final)" if e == num_exits - 1 else "") for e in range(num_exits)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, runs in results.items():
    for metric in metrics:
      per_exit = np.asarray([exit_values(r, split, metric) for r in runs if split in r])
      if per_exit.size == 0:
        continue
      label = _label(study, name) + ("" if len(metrics) == 1 else f" ({metric})")
      lines.append("| " + " | ".join([label, str(len(per_exit))] + [fmt(per_exit[:, e]) for e in range(num_exits)]) + " |")
  return "\n".join(lines) + "\n"


def ratio_table(study, results: dict) -> str:
  metric = _metric(results)
  head = ["cell", "seeds", "full model (ratio 1)"] + [f"at >= {r:g}x layers" for r in study.ratios]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, runs in results.items():
    cols = [fmt([r["dev"]["per_exit"][-1][metric] for r in runs])]
    for ratio in study.ratios:
      rows = [frontier_row(r["dev"]["settings"], metric, ratio) for r in runs]
      got = [row["layer_ratio"] for row in rows if row is not None]
      cols.append(fmt([float("nan") if row is None else row[metric] for row in rows])
                  + (f" ({np.mean(got):.2f}x)" if got else ""))
    lines.append("| " + " | ".join([_label(study, name), str(len(runs))] + cols) + " |")
  return "\n".join(lines) + "\n"


def cost_table(study, results: dict) -> str:
  batch = next((_batch(r["speed"]) for runs in results.values() for r in runs if "speed" in r), "?")
  lines = ["| cell | seeds | steps | train seconds (mean ± std; fastest) | timed setting | layer ratio | "
           f"measured speed-up, batch {batch} | measured speed-up, batch 1 |", "|---|---|---|---|---|---|---|---|"]
  for name, runs in results.items():
    timed = next((r["speed"] for r in runs if "speed" in r), None)
    speed_cols = ["-"] * 4 if timed is None else [
        timed["setting"], f"{timed['layer_ratio']:.2f}",
        f"{_throughput(timed):.2f}x", f"{timed['latency_speedup_b1']:.2f}x"]
    steps = runs[0].get("train_steps")
    resumed = sum(max((r.get("train_attempts") or 1) - 1, 0) for r in runs)
    times = [r["train_seconds"] for r in runs]
    seconds = fmt(times, 0) + (f"; fastest {finite(times).min():.0f}" if finite(times).size > 1 else "") + (
        f" ({resumed} resume(s) included)" if resumed else "")
    lines.append("| " + " | ".join([_label(study, name), str(len(runs)), str(steps if steps is not None else "-"),
                                     seconds] + speed_cols) + " |")
  return "\n".join(lines) + "\n"


def _throughput(speed_row: dict) -> float:
  return next(v for k, v in speed_row.items() if k.startswith("throughput_speedup_b"))


def _batch(speed_row: dict) -> str:
  return next(k for k in speed_row if k.startswith("throughput_speedup_b"))[len("throughput_speedup_b"):]


# ----------------------------------------------------------------------------- verdicts


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
  """(mean(a) - mean(b), its standard error sqrt(s_a^2/n_a + s_b^2/n_b), min(n_a, n_b)) over finite values."""
  (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
  na, nb = finite(a).size, finite(b).size
  return ma - mb, math.sqrt(sa ** 2 / max(na, 1) + sb ** 2 / max(nb, 1)), min(na, nb)


def verdict(diff: float, se: float, margin: float = 0.0, seeds: int = 2) -> str:
  """'holds' when diff exceeds margin by two standard errors, 'fails' when it falls short of it by
  two, else 'not resolved' (the seeds cannot tell); one seed per side has no standard error: 'one seed'."""
  if seeds < 2:
    return "one seed"
  if diff - margin > 2 * se:
    return "holds"
  if diff - margin < -2 * se:
    return "fails"
  return "not resolved"


def claims(study, results: dict) -> list[dict]:
  """The paper's claims on this study's numbers (roles from `StudyConfig.claims`)."""
  roles = {role: name for role, name in study.claims if name in results}
  metric, out = _metric(results), []
  exits = lambda name, e: [exit_values(r)[e] for r in results[name]]

  def add(claim: str, a, b, margin: float = 0.0):
    d, se, n = compare(a, b)
    out.append({"claim": claim, "difference": d, "se": se, "seeds": n, "verdict": verdict(d, se, margin, n)})

  if "romebert" in roles and "deebert" in roles:
    num_exits = len(results[roles["romebert"]][0]["dev"]["per_exit"])
    for e in range(num_exits - 1):
      add(f"RomeBERT's exit {e + 1} above DeeBERT's", exits(roles["romebert"], e), exits(roles["deebert"], e))
    for rival in ("deebert", "final_only"):
      if rival in roles:
        add(f"RomeBERT's final exit within 1 point of {_label(study, roles[rival])}'s",
            exits(roles["romebert"], -1), exits(roles[rival], -1), margin=-1.0)
  if "romebert" in roles and "romebert_sd" in roles:
    a, b = results[roles["romebert"]], results[roles["romebert_sd"]]
    add("GR above SD alone (mean over exits)", [np.mean(exit_values(r)) for r in a], [np.mean(exit_values(r)) for r in b])
    add("GR above SD alone (final exit)", exits(roles["romebert"], -1), exits(roles["romebert_sd"], -1))
    ratio = study.speed_ratio
    add(f"GR above SD alone (best setting at >= {ratio:g}x layers)",
        [frontier(r["dev"]["settings"], metric, ratio) for r in a], [frontier(r["dev"]["settings"], metric, ratio) for r in b])
  return out


def claims_table(rows: Sequence[dict], metric: str) -> str:
  lines = [f"| claim | difference in {metric} (points) | standard error | seeds | verdict |", "|---|---|---|---|---|"]
  lines += [f"| {r['claim']} | {r['difference']:+.2f} | {r['se']:.2f} | {r['seeds']} | {r['verdict']} |" for r in rows]
  return "\n".join(lines) + "\n"


def choose_recipe(study, results: dict) -> Optional[dict]:
  """The recipe rule, on the held-out train rows only (every seed of a recipe finished): a candidate
  replaces the published recipe only when its mean final-exit metric beats the published one's by more
  than two standard errors (`verdict` 'holds', seeds paired as in the claims) and its mean over exits is
  at most `max_mean_exits_drop` points below the published one's; of several, the highest final exit."""
  recipe = dict(study.recipe)
  if not recipe:
    return None
  names = [recipe["published"], *recipe.get("candidates", ())]
  full = [n for n in names if n in results and len(results[n]) == len(study.seeds) and all("heldout" in r for r in results[n])]
  if recipe["published"] not in full:
    return None
  held = {n: [exit_values(r, "heldout") for r in results[n]] for n in full}
  finals = {n: [h[-1] for h in held[n]] for n in full}
  means = {n: [float(np.mean(h)) for h in held[n]] for n in full}
  pub, drop = recipe["published"], float(recipe.get("max_mean_exits_drop", 1.0))
  rows = []
  for name in full:
    d, se, n = compare(finals[name], finals[pub])
    eligible = name != pub and verdict(d, se, 0.0, n) == "holds" and mean_std(means[name])[0] >= mean_std(means[pub])[0] - drop
    rows.append({"cell": name, "heldout_final": mean_std(finals[name]), "heldout_mean_exits": mean_std(means[name]),
                 "final_vs_published": (d, se), "eligible": eligible})
  winners = [r for r in rows if r["eligible"]]
  chosen = max(winners, key=lambda r: r["heldout_final"][0])["cell"] if winners else pub
  return {"rows": rows, "chosen": chosen, "published": pub, "drop": drop, "heldout_rows": list(study.heldout_rows)}


def recipe_table(study, results: dict, choice: dict) -> str:
  metric = _metric(results)
  lines = [f"| recipe | held-out final exit | vs published (± s.e.) | held-out mean over exits | dev final exit | "
           f"dev mean over exits | dev at >= {study.speed_ratio:g}x layers | chosen |", "|---|---|---|---|---|---|---|---|"]
  for row in choice["rows"]:
    runs = results[row["cell"]]
    held = [exit_values(r, "heldout") for r in runs]
    dev = [exit_values(r) for r in runs]
    lines.append("| " + " | ".join([
        _label(study, row["cell"]), fmt([h[-1] for h in held]),
        "-" if row["cell"] == choice["published"] else "{:+.2f} ± {:.2f}".format(*row["final_vs_published"]),
        fmt([float(np.mean(h)) for h in held]), fmt([d[-1] for d in dev]), fmt([float(np.mean(d)) for d in dev]),
        fmt([frontier(r["dev"]["settings"], metric, study.speed_ratio) for r in runs]),
        "**yes**" if row["cell"] == choice["chosen"] else ""]) + " |")
  return "\n".join(lines) + "\n"


def settings_rows(results: dict) -> list[dict]:
  """Every sweep setting of every cell, mean ± std over seeds of its metrics and layer ratio."""
  rows = []
  for name, runs in results.items():
    rec = runs[0]["dev"]
    names = [rec["metric"]] + [m for m in rec["metric_names"] if m != rec["metric"] and m != "mse"]
    for i, setting in enumerate(rec["settings"]):
      row = {"cell": name, "setting": setting["setting"]}
      for key in [*names, "layer_ratio"]:
        m, sd = mean_std([r["dev"]["settings"][i][key] for r in runs])
        row[key], row[f"{key}_std"] = round(m, 3), round(sd, 3)
      rows.append(row)
  return rows


def _delta(setting: str) -> Optional[str]:
  return setting.partition(",delta=")[2] or None


# ----------------------------------------------------------------------------- plot


def curves(results: dict, metric: str) -> dict:
  """Per cell: (ratios, mean, std) of the frontier over seeds on RATIO_GRID (NaN beyond the reach of a seed)."""
  out = {}
  for name, runs in results.items():
    per_seed = np.asarray([[frontier(r["dev"]["settings"], metric, x) for x in RATIO_GRID] for r in runs])
    ok = ~np.isnan(per_seed).any(axis=0)
    mean = per_seed[:, ok].mean(axis=0)
    std = per_seed[:, ok].std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    out[name] = (RATIO_GRID[ok], mean, std)
  return out


def plot_tradeoff(path: Path, study, results: dict) -> Path:
  """Left: every cell's frontier over the whole ratio range; right: the same, zoomed on the top 10 points of
  the metric (where the methods differ); stars: the measured wall-clock speed-up of each cell's timed setting."""
  import matplotlib.pyplot as plt
  metric = _metric(results)
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
  shown = {n: r for n, r in results.items() if not study.plot_cells or n in study.plot_cells}
  top = -np.inf
  for i, (name, (xs, mean, std)) in enumerate(curves(shown, metric).items()):
    color = f"C{i % 10}"
    top = max(top, float(np.max(mean + std)))
    timed = next((r["speed"] for r in results[name] if "speed" in r), None)
    for ax in axes:
      ax.plot(xs, mean, color=color, label=f"{_label(study, name)} (n={len(results[name])})")
      ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
      if timed is not None:
        ax.scatter([_throughput(timed)], [timed["metric_value"]], marker="*", s=140, color=color, edgecolor="black",
                   zorder=3)
  batch = next((_batch(r["speed"]) for runs in shown.values() for r in runs if "speed" in r), "?")
  axes[0].scatter([], [], marker="*", s=140, color="white", edgecolor="black",
                  label=f"measured wall-clock speed-up (batch {batch}) of the setting nearest {study.speed_ratio:g}x")
  if np.isfinite(top):
    axes[1].set_ylim(top - 10, top + 0.5)
  axes[1].set_xlim(1.0, max(study.ratios) + 0.5)
  for ax in axes:
    ax.set_xlabel("layer ratio (L / average exit layer): best setting reaching it")
    ax.grid(alpha=0.3)
  axes[1].set_title("zoom", fontsize=9)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{study.name}: {metric} vs speed-up, mean over seeds, band ±1 std")
  return save_plot(fig, axes[0], path, metric, "all settings")


def plot_patience(path: Path, study, results: dict) -> Path:
  """Regression patience: per cell, one curve per delta over the patience values (means over seeds)."""
  import matplotlib.pyplot as plt
  metric = _metric(results)
  rows = settings_rows(results)
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
  for ax, name in zip(axes[0], results):
    for j, delta in enumerate(dict.fromkeys(_delta(r["setting"]) for r in rows if r["cell"] == name)):
      pts = sorted((r["layer_ratio"], r[metric]) for r in rows if r["cell"] == name and _delta(r["setting"]) == delta)
      ax.plot(*zip(*pts), marker="o", color=f"C{j % 10}", label=f"delta {delta}")
    ax.set_xlabel("layer ratio (patience 1..: right to left)")
    ax.set_title(_label(study, name), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"{study.name}: {metric} by patience and delta (mean over seeds)")
  return save_plot(fig, axes[0][0], path, metric, _label(study, next(iter(results))))


# ----------------------------------------------------------------------------- the report


def summary(study, results: dict) -> dict:
  metric = _metric(results)
  out = {"study": study.name, "metric": metric, "seeds": list(study.seeds), "cells": {}}
  for name, runs in results.items():
    per_exit = np.asarray([exit_values(r) for r in runs])
    out["cells"][name] = {
        "label": _label(study, name), "seeds": [r["seed"] for r in runs],
        "per_exit_mean": per_exit.mean(axis=0).round(3).tolist(),
        "per_exit_std": (per_exit.std(axis=0, ddof=1) if len(runs) > 1 else 0 * per_exit[0]).round(3).tolist(),
        "at_ratio": {f"{ratio:g}": mean_std([frontier(r["dev"]["settings"], metric, ratio) for r in runs])
                     for ratio in study.ratios},
        "train_seconds": mean_std([r["train_seconds"] for r in runs]),
        "speed": next((r["speed"] for r in runs if "speed" in r), None)}
  out["claims"] = claims(study, results)
  out["recipe"] = choose_recipe(study, results)
  return out


def markdown(study, results: dict) -> str:
  metric = _metric(results)
  parts = [f"# Study {study.name}\n\n",
           f"Seeds {list(study.seeds)}; mean ± sample std over the seeds finished (column 'seeds'). Metric: {metric}.\n",
           "\n## Dev per exit\n\n", per_exit_table(study, results),
           f"\n## Dev {metric} at a layer-ratio speed-up\n\n",
           f"Best {study.criterion} setting whose layer ratio is at least the target (no interpolation), per seed; "
           "in brackets the mean layer ratio those settings reach.\n\n",
           ratio_table(study, results),
           "\n## Training cost and measured speed\n\n", cost_table(study, results)]
  rows = claims(study, results)
  if rows:
    parts += ["\n## Claims\n\n", "holds / fails: the difference clears 0 (for 'within 1 point': -1) by two standard "
              "errors either way; not resolved: it does not (standard error from the seeds' sample std).\n\n", claims_table(rows, metric)]
  choice = choose_recipe(study, results)
  if choice is not None:
    a, b = choice["heldout_rows"]
    parts += ["\n## Recipe\n\n", f"Chosen on train rows {a}..{b - 1} (held out from training): a candidate replaces "
              f"the published recipe only when its mean final exit there beats the published one's by more than two "
              f"standard errors, with its mean over exits at most {choice['drop']:g} point(s) below; dev is shown "
              f"beside it, never used to choose.\n\n", recipe_table(study, results, choice)]
  return "".join(parts)


def write_report(study, results: dict, out: Path) -> list[Path]:
  if not results:
    return []
  from rome_flax.report import write_table
  out = Path(out)
  written = [files.write_json(out / "study.json", summary(study, results)),
             files.atomic_write_text(out / "tables.md", markdown(study, results)),
             *write_table(out, "settings", settings_rows(results)),
             plot_tradeoff(out / "tradeoff.png", study, results)]
  if study.deltas:
    written.append(plot_patience(out / "patience.png", study, results))
  return written
