"""Writing early-exit results: JSON, CSV, Markdown tables, PNG plots, prediction and GLUE submission
files, and `write_evaluation`, which writes every file of an `evaluation.ExitsEvaluation`.

Every file goes through `files.py`'s atomic writer, so a crash or a full disk never leaves a
half-written result, and an earlier result stays intact until its replacement is complete.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from rome_flax.io import files
from rome_flax.kinds import kind as task_kinds
from rome_flax.kinds.writers import (MNLI_SUBMISSION, SUBMISSION_NAMES, predictions_conll,  # noqa: F401
                                     predictions_tsv, submission_file, submission_tsv)   # (re-exported)

# A trade-off plot per speed axis a task kind asks for (`TaskKind.plots`): file, axis name, label of the crosses.
TRADEOFF_PLOTS = {"layer_ratio": ("tradeoff.png", "layer ratio", "measured, throughput b={b}"),
                  "flops_ratio": ("tradeoff_flops.png", "FLOPs ratio", "measured speed-up, b={b}")}
# What write_evaluation writes (glob patterns): all that infer.py --overwrite may replace.
RESULT_ENTRIES = ("per_exit.*", "static.*", "sweep.*", "tokee.*", "speed.*", "tradeoff.png", "tradeoff_flops.png",
                  "summary.json", "predictions", "submission")


def _cell(v, digits: int | None = 4) -> str:
  """Markdown shows 4 significant digits; CSV (digits=None) the shortest exact form."""
  if isinstance(v, float):
    return repr(v) if digits is None else f"{v:.{digits}g}"
  if isinstance(v, (list, tuple)):
    return " ".join(_cell(x, digits) for x in v)
  return str(v)


def table_columns(rows: Sequence[dict]) -> list[str]:
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  return columns


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  columns = list(columns or table_columns(rows))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_cell(row[c], None) if c in row else "" for c in columns])
  return buf.getvalue()


def to_markdown(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  columns = list(columns or table_columns(rows))
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row[c]) if c in row else "" for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_table(out_dir, stem: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> list[Path]:
  """<stem>.json, <stem>.csv and <stem>.md in out_dir."""
  out_dir = Path(out_dir)
  return [files.write_json(out_dir / f"{stem}.json", list(rows)),
          files.atomic_write_text(out_dir / f"{stem}.csv", to_csv(rows, columns)),
          files.atomic_write_text(out_dir / f"{stem}.md", to_markdown(rows, columns))]


def new_axes():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(figsize=(6, 4))


def save_plot(fig, ax, path, ylabel: str, title: str) -> Path:
  """Labels, grid and title, then the PNG through the atomic writer; the figure is closed either way."""
  import matplotlib.pyplot as plt
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.set_title(title)
  try:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return files.atomic_write_bytes(path, buf.getvalue())
  finally:
    plt.close(fig)


def curve_name(row: dict) -> str:
  """The curve a sweep row belongs to: its criterion, and a TOKEE row's window (one line per window)."""
  return f"{row['criterion']} window {row['window']}" if row.get("window") is not None else row["criterion"]


def plot_title(what: str, checkpoint=None, task: str | None = None, split: str | None = None) -> str:
  """A title a reader understands alone: what is plotted, the model, the task and split, the date."""
  import datetime
  model = Path(str(checkpoint)).name if checkpoint else None
  if model == "export" and checkpoint:   # runs/NAME/export: the run's name says more
    model = Path(str(checkpoint)).parent.name or model
  where = ", ".join(x for x in (model, f"{task} {split}" if task else None) if x)
  return f"{what}\n{where + ', ' if where else ''}{datetime.date.today().isoformat()}"


def plot_tradeoff(path, settings: Sequence[dict], metric: str, final_metric: float | None = None,
                  speed: str = "layer_ratio", measured: Sequence[tuple] = (), measured_label: str = "measured",
                  title: str | None = None) -> Path:
  """Task metric against speed-up, one curve per criterion (TOKEE: per window; 'static': the model cut
  to k layers, the baseline); measured wall-clock points as crosses, each labelled with its setting
  (`measured`: (metric, speed-up) or (metric, speed-up, setting)); the legend outside the data."""
  fig, ax = new_axes()
  for curve in dict.fromkeys(curve_name(r) for r in settings):
    pts = sorted((r[speed], r[metric]) for r in settings if curve_name(r) == curve and metric in r)
    if pts:
      ax.plot(*zip(*pts), marker="o", markersize=4, label=curve)
  if measured:
    ys, xs = [m[0] for m in measured], [m[1] for m in measured]
    ax.scatter(xs, ys, marker="x", s=60, color="black", zorder=3, label=f"{measured_label} (wall clock)")
    for m in measured:
      if len(m) > 2:
        ax.annotate(str(m[2]), (m[1], m[0]), textcoords="offset points", xytext=(4, -10), fontsize=7)
  if final_metric is not None:
    ax.axhline(final_metric, color="gray", linestyle="--", linewidth=1, label="final exit (full model)")
  xlabel = {"layer_ratio": "layer ratio (L / average exit layer)",
            "flops_ratio": "FLOPs ratio (full / early exit)"}.get(speed, speed)
  ax.set_xlabel(f"speed-up: {xlabel}" + ("; crosses: measured wall clock" if measured else ""))
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
  return save_plot(fig, ax, path, metric, title or f"{metric} vs speed-up")


def plot_per_exit(path, per_exit: Sequence[dict], metric: str, title: str | None = None) -> Path:
  """Task metric of each exit used alone."""
  fig, ax = new_axes()
  ax.plot([r["exit"] for r in per_exit], [r[metric] for r in per_exit], marker="o")
  ax.set_xlabel("exit (layer)")
  ax.set_xticks([r["exit"] for r in per_exit])
  return save_plot(fig, ax, path, metric, title or f"{metric} per exit")


def safe_name(setting: str) -> str:
  """A setting (e.g. 'entropy<0.1') as a file name."""
  return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in setting.replace("<", "_lt_")
                 .replace(">=", "_ge_"))


def write_evaluation(out_dir, evaluation, *, checkpoint=None) -> list[Path]:
  """Every file of an `evaluation.ExitsEvaluation` in out_dir; returns their paths.

  per_exit.{json,csv,md,png} and static.{json,csv,md} (the model cut to k layers; labelled),
  sweep.{json,csv,md}, predictions/<setting>.tsv (token
  tasks: predictions/<setting>.conll, word gold predicted exit_layer),
  submission/<setting>/<GLUE name>.tsv (unlabelled), speed.{json,csv,md} (timed settings),
  tradeoff.png (labelled) and summary.json (`checkpoint` names the model there).
  """
  ev, out = evaluation, Path(out_dir)
  written = []
  if ev.per_exit:
    written += write_table(out, "per_exit", ev.per_exit)
    written.append(plot_per_exit(out / "per_exit.png", ev.per_exit, ev.metric,
                                 title=plot_title(f"{ev.metric} per exit", checkpoint, ev.task.name, ev.split)))
    written += write_table(out, "static", ev.static, ev.sweep_columns)
  written += write_table(out, "sweep", ev.settings, ev.sweep_columns)
  kind = task_kinds.kind_of(ev.task)
  if ev.token_settings:
    written += write_table(out, "tokee", ev.token_settings, [c for c in ev.sweep_columns if c != "exit_shares"]
                           + ["window", "exit_shares"])
  for policy, predictions, exits in zip(ev.policies + ev.token_policies, ev.predictions + ev.token_predictions,
                                        ev.exits + ev.token_exits):   # every setting, TOKEE's too
    written += kind.write_predictions(out, safe_name(policy.describe()), ev, predictions, exits)
  if ev.speed:
    written += write_table(out, "speed", ev.speed)
  if ev.labelled:
    speedup = f"throughput_speedup_b{ev.batch_size}"
    rows = ev.settings + ev.static + ev.token_settings   # TOKEE in every trade-off plot where it ran
    measured = [(r[ev.metric], s[speedup], s["setting"]) for s in ev.speed for r in rows
                if r["setting"] == s["setting"]]
    title = lambda speed: plot_title(f"{ev.metric} vs {speed}", checkpoint, ev.task.name, ev.split)
    for speed in kind.plots():   # token tasks add FLOPs: SENTEE, TOKEE and the static exit on one currency
      file, axis, label = TRADEOFF_PLOTS[speed]
      written.append(plot_tradeoff(out / file, rows, ev.metric, final_metric=ev.final_metric, speed=speed,
                                   measured=measured, measured_label=label.format(b=ev.batch_size), title=title(axis)))
  written.append(files.write_json(out / "summary.json", {"checkpoint": checkpoint, **ev.summary}))
  return written
