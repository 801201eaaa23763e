"""Writing sweep results: JSON, CSV, Markdown tables, PNG plots, GLUE submission files.

Every file is written atomically (a temporary file in the same directory, then `os.replace`), so a
crash or a full disk never leaves a half-written result, and an earlier result stays intact until
its replacement is complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from rome_flax.errors import RomeFlaxError

SPEED_COLUMNS = ("avg_exit_layer", "layer_ratio", "flops_ratio")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  except OSError as e:
    raise RomeFlaxError(f"cannot write {path}: {e.strerror or e}") from None
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
  return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


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
  return [write_json(out_dir / f"{stem}.json", list(rows)),
          atomic_write_text(out_dir / f"{stem}.csv", to_csv(rows, columns)),
          atomic_write_text(out_dir / f"{stem}.md", to_markdown(rows, columns))]


def _savefig(fig, path) -> Path:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  return atomic_write_bytes(path, buf.getvalue())


def plot_tradeoff(path, settings: Sequence[dict], metric: str, final_metric: float | None = None,
                  speed: str = "layer_ratio", measured: Sequence[tuple] = (), measured_label: str = "measured") -> Path:
  """Task metric against speed-up, one curve per criterion; measured wall-clock points as crosses."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for criterion in dict.fromkeys(r["criterion"] for r in settings):
    pts = sorted((r[speed], r[metric]) for r in settings if r["criterion"] == criterion and metric in r)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=criterion)
  if measured:
    ys, xs = zip(*measured)
    ax.scatter(xs, ys, marker="x", s=60, color="black", zorder=3, label=f"{measured_label} (wall clock)")
  if final_metric is not None:
    ax.axhline(final_metric, color="gray", linestyle="--", linewidth=1, label="final exit (full model)")
  xlabel = {"layer_ratio": "layer ratio (L / average exit layer)",
            "flops_ratio": "FLOPs ratio (full / early exit)"}.get(speed, speed)
  ax.set_xlabel(f"speed-up: {xlabel}" + ("; crosses: measured wall clock" if measured else ""))
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(f"{metric} vs speed-up")
  try:
    return _savefig(fig, path)
  finally:
    plt.close(fig)


def plot_per_exit(path, per_exit: Sequence[dict], metric: str) -> Path:
  """Task metric of each exit used alone."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["exit"] for r in per_exit], [r[metric] for r in per_exit], marker="o")
  ax.set_xlabel("exit (layer)")
  ax.set_ylabel(metric)
  ax.set_xticks([r["exit"] for r in per_exit])
  ax.grid(alpha=0.3)
  ax.set_title(f"{metric} per exit")
  try:
    return _savefig(fig, path)
  finally:
    plt.close(fig)


def submission_tsv(example_ids, predictions, label_names: Sequence[str]) -> str:
  """GLUE submission file: `index<TAB>prediction`, label names for classification, values for regression."""
  lines = ["index\tprediction"]
  for i, p in zip(np.asarray(example_ids).tolist(), np.asarray(predictions).tolist()):
    lines.append(f"{i}\t{label_names[int(p)] if label_names else f'{float(p):.6g}'}")
  return "\n".join(lines) + "\n"


def best_tradeoff(settings: Sequence[dict], metric: str, reference: float, tolerance: float = 1.0):
  """The setting with the highest layer ratio whose metric is within `tolerance` of the reference."""
  ok = [r for r in settings if metric in r and r[metric] >= reference - tolerance]
  return max(ok, key=lambda r: r["layer_ratio"]) if ok else None
