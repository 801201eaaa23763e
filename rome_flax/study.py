"""`python -m rome_flax study --config configs/study_sst2.py`: a seeded results study.

A study trains every (cell, seed) of a grid, evaluates each run offline on the dev set (every exit,
and one early-exit sweep from one all-exits pass), times one setting per cell for real, and hands the
stored results to `study_report`, which writes the tables and plots. Each (cell, seed) ends with a
`result.json`; a re-run skips those, resumes a run killed mid-training from its last checkpoint,
and restarts one killed before its first checkpoint, so a killed study loses at most one
checkpoint interval.

A study config is a Python file whose `get_config()` returns a dict:
  name, train (TrainConfig overrides shared by every cell), cells (a list of dicts: name, label and
  the cell's own TrainConfig overrides), seeds, criterion and thresholds (the sweep; `deltas` too for
  patience on a regression task), ratios (the layer ratios of the ratio table), speed_ratio (the
  timed setting of each cell: nearest this layer ratio in the first seed's sweep), heldout_rows
  ((start, stop) of the TRAIN split: a validation slice the recipe is chosen on, never the dev set),
  heldout_cells, claims and recipe (see study_report), plot_cells.
Seeds change the data order, dropout and the new heads' init (`OptimOptions.seed`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rome_flax.errors import RomeFlaxError
from rome_flax.io import files

RESULT_FILE = "result.json"
TIMING_FILE = "train_seconds.json"


CLAIM_ROLES = ("romebert", "romebert_sd", "deebert", "final_only")   # what study_report.claims reads
RUN_OWNED = ("seed", "output_dir")    # set per run by the study, never by a config
LIST_KEYS = ("seeds", "thresholds", "deltas", "ratios", "heldout_rows", "heldout_cells", "plot_cells")


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str                       # directory name and table key
  label: str                      # how tables and plots name it
  overrides: tuple                # ((TrainConfig field, value), ...) on top of the study's `train`

  @property
  def overrides_dict(self) -> dict:
    return dict(self.overrides)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  name: str
  train: tuple                    # ((field, value), ...): every cell's TrainConfig overrides
  cells: tuple[Cell, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  criterion: str = "entropy"
  thresholds: tuple = ()          # criterion values of the sweep
  deltas: tuple = ()              # patience on a regression task: crossed with the thresholds
  ratios: tuple = (1.5, 2.0, 3.0)
  speed_ratio: float = 2.0        # the timed setting: the first seed's setting nearest this layer ratio
  latency_examples: int = 128
  eval_batch_size: int = 64
  heldout_rows: Optional[tuple] = None   # (start, stop) rows of the train split, after every cell's train_rows
  heldout_cells: tuple = ()
  claims: tuple = ()              # ((role, cell name), ...): roles from CLAIM_ROLES
  recipe: tuple = ()              # ((key, value), ...): published, candidates, max_mean_exits_drop
  plot_cells: tuple = ()          # cells the trade-off plot shows (default: every cell)
  keep_checkpoints: bool = False  # False: a finished run keeps its export only (an SST-2 run's checkpoints: ~0.6 GB)

  def __post_init__(self):
    names = [c.name for c in self.cells]
    recipe = dict(self.recipe)
    recipe_cells = [recipe.get("published"), *recipe.get("candidates", ())] if recipe else []
    numbers = lambda xs: all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    problems = [
        f"cell names repeat: {names}" if len(set(names)) != len(names) else None,
        "a study needs at least one cell" if not self.cells else None,
        "seeds must be a non-empty list of distinct integers" if not self.seeds or len(set(self.seeds)) != len(self.seeds)
        or not all(isinstance(x, int) for x in self.seeds) else None,
        "thresholds must be a non-empty list of numbers" if not self.thresholds or not numbers(self.thresholds) else None,
        "deltas must be a list of numbers" if not numbers(self.deltas) else None,
        "ratios must be a non-empty list of numbers >= 1" if not self.ratios or not numbers(self.ratios)
        or min(self.ratios) < 1 else None,
        "a recipe needs its 'published' cell" if recipe and recipe.get("published") is None else None,
        "recipe max_mean_exits_drop must be >= 0" if float(recipe.get("max_mean_exits_drop", 1.0)) < 0 else None,
        "a recipe is chosen on heldout_rows: set them" if recipe and self.heldout_rows is None else None]
    problems += [f"unknown recipe key {k!r}" for k in recipe if k not in ("published", "candidates", "max_mean_exits_drop")]
    problems += [f"heldout_cells names unknown cell {c!r}" for c in self.heldout_cells if c not in names]
    problems += [f"claims name unknown cell {c!r}" for _, c in self.claims if c not in names]
    problems += [f"unknown claim role {r!r} (roles: {', '.join(CLAIM_ROLES)})" for r, _ in self.claims if r not in CLAIM_ROLES]
    problems += [f"plot_cells names unknown cell {c!r}" for c in self.plot_cells if c not in names]
    problems += [f"recipe cell {c!r} is not in heldout_cells (a recipe is chosen on the held-out rows)"
                 for c in recipe_cells if c is not None and c not in self.heldout_cells]
    problems += [f"{k!r} is set by the study for each run, not by its config"
                 for k, _ in self.train + tuple(x for c in self.cells for x in c.overrides) if k in RUN_OWNED]
    if self.heldout_rows is not None and not (len(self.heldout_rows) == 2 and 0 <= self.heldout_rows[0] < self.heldout_rows[1]):
      problems.append(f"heldout_rows must be (start, stop) with 0 <= start < stop, got {self.heldout_rows}")
    elif self.heldout_rows is not None:
      for c in self.cells:
        rows = {**dict(self.train), **c.overrides_dict}.get("train_rows", 0)
        if c.name in self.heldout_cells and not 0 < rows <= self.heldout_rows[0]:
          problems.append(f"cell {c.name} trains on {rows or 'all'} train rows, which overlap heldout_rows "
                          f"{tuple(self.heldout_rows)}")
    problems = [p for p in problems if p]
    if problems:
      raise RomeFlaxError(f"study {self.name}: {'; '.join(problems)}")

  def cell(self, name: str) -> Cell:
    found = [c for c in self.cells if c.name == name]
    if not found:
      raise RomeFlaxError(f"study {self.name} has no cell {name!r}; it has {', '.join(c.name for c in self.cells)}")
    return found[0]

  def train_overrides(self, cell: Cell, seed: int, run_dir: Path) -> dict:
    return {**dict(self.train), **cell.overrides_dict, "seed": seed, "output_dir": str(run_dir)}

  def evaluated_on_heldout(self, cell: Cell) -> bool:
    return cell.name in self.heldout_cells


def _pairs(d, what: str) -> tuple:
  if d is None:
    return ()
  if not isinstance(d, dict):
    raise RomeFlaxError(f"study {what} must be a dict, got {type(d).__name__}")
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items())


def from_dict(raw: dict) -> StudyConfig:
  """A StudyConfig from a config file's dict (lists allowed wherever tuples are stored)."""
  raw = dict(raw)
  known = {f.name for f in dataclasses.fields(StudyConfig)}
  unknown = sorted(set(raw) - known)
  if unknown:
    raise RomeFlaxError(f"unknown study key(s): {', '.join(unknown)}")
  if "name" not in raw:
    raise RomeFlaxError("a study config needs a 'name'")
  cells = raw.pop("cells", ())
  if not isinstance(cells, (list, tuple)) or not all(isinstance(c, dict) and "name" in c for c in cells):
    raise RomeFlaxError("study cells must be a list of dicts, each with a 'name' (and optional 'label', 'overrides')")
  out = {"cells": tuple(Cell(str(c["name"]), str(c.get("label", c["name"])), _pairs(c.get("overrides"), "cell overrides"))
                        for c in cells),
         "train": _pairs(raw.pop("train", None), "train"), "claims": _pairs(raw.pop("claims", None), "claims"),
         "recipe": _pairs(raw.pop("recipe", None), "recipe")}
  for key, value in raw.items():
    if key in LIST_KEYS and value is not None and not isinstance(value, (list, tuple)):
      raise RomeFlaxError(f"study {key} must be a list, got {value!r}")
    out[key] = tuple(value) if isinstance(value, list) else value
  return StudyConfig(**out)


def with_overrides(study: StudyConfig, train: Optional[dict] = None, seeds: Optional[Sequence[int]] = None) -> StudyConfig:
  """The study with TrainConfig overrides for every cell (e.g. a local --model) and other seeds."""
  changes = {"train": tuple({**dict(study.train), **(train or {})}.items())}
  if seeds is not None:
    changes["seeds"] = tuple(seeds)
  return dataclasses.replace(study, **changes)


def load_study_config(path: str | Path) -> StudyConfig:
  from rome_flax.train import train_config as tc
  return from_dict(tc.read_config_dict(path, "study settings"))


# ----------------------------------------------------------------------------- one (cell, seed)


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
  return out / cell.name / f"seed{seed}"


def train_config(study: StudyConfig, cell: Cell, seed: int, out: Path):
  from rome_flax.train import train_config as tc
  try:
    return tc.TrainConfig().replace(**study.train_overrides(cell, seed, run_dir(out, cell, seed) / "train"))
  except RomeFlaxError as e:
    raise RomeFlaxError(f"study {study.name}, cell {cell.name}: {e}") from None


def policies(study: StudyConfig, model_cfg) -> list:
  """The sweep's settings: each threshold (crossed with each delta for regression patience)."""
  from rome_flax.engine import exit_policy as ep
  deltas = study.deltas or (None,)
  return [ep.policy_for(model_cfg, study.criterion, float(t), delta=d) for d in deltas for t in study.thresholds]


def _read_timing(path: Path) -> dict:
  """A run's accumulated training seconds and attempts (None before its first attempt)."""
  return json.loads(path.read_text()) if path.is_file() else {"seconds": None, "attempts": None}


def _train(cfg, timing_path: Path, say) -> None:
  """Trains (or resumes) one run, adding its wall-clock seconds to timing_path (also when stopped by an
  exception or SIGTERM / Ctrl-C; a SIGKILLed attempt's seconds are lost)."""
  from rome_flax.train import trainer
  out = Path(cfg.run.output_dir)
  resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
  overwrite = out.is_dir() and any(out.iterdir()) and not resume   # killed before its first checkpoint
  timing = _read_timing(timing_path)
  say(f"  training ({'resuming' if resume else 'fresh'}) -> {out}")
  start = time.perf_counter()
  try:
    trainer.train(cfg, resume=resume, overwrite=overwrite, progress=False)
  finally:
    timing = {"seconds": (timing["seconds"] or 0.0) + time.perf_counter() - start, "attempts": (timing["attempts"] or 0) + 1}
    files.write_json(timing_path, timing)


def _examples(task, cfg, split: str, rows: Optional[tuple] = None):
  from rome_flax.kinds.kind import kind_of
  examples = kind_of(task).read(task, split, cfg.data.sources())
  if rows is not None:
    if rows[1] > len(examples):
      raise RomeFlaxError(f"heldout_rows {tuple(rows)} go past the {len(examples)} rows of the train split")
    examples = examples.rows(*rows)
  return examples


def _sweep_record(ev) -> dict:
  """What the report needs of one evaluation: every exit's metrics and every setting's row."""
  keep = ("setting", "avg_exit_layer", "layer_ratio", "flops_ratio", *ev.task.metric_names)
  return {"metric": ev.metric, "metric_names": list(ev.task.metric_names), "examples": ev.num_examples,
          "per_exit": ev.per_exit, "settings": [{k: r[k] for k in keep if k in r} for r in ev.settings]}


def _last_step(run_out: Path) -> Optional[int]:
  """The run's last logged step (its metrics file), None without one."""
  from rome_flax.train.trainer import METRICS_FILE, record_step
  path = run_out / METRICS_FILE
  steps = [record_step(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
  return max((int(s) for s in steps if s != float("inf")), default=None)


def nearest_setting(settings: Sequence[dict], ratio: float) -> dict:
  """The setting whose layer ratio is nearest `ratio` (the larger ratio on a tie)."""
  return min(settings, key=lambda r: (abs(r["layer_ratio"] - ratio), -r["layer_ratio"]))


def eval_spec(study: StudyConfig, cell: Cell) -> dict:
  """What a run's evaluation depends on besides its training: a result made under another spec is stale."""
  spec = {"criterion": study.criterion, "thresholds": list(study.thresholds), "deltas": list(study.deltas),
          "speed_ratio": study.speed_ratio}
  if study.evaluated_on_heldout(cell):
    spec["heldout_rows"] = list(study.heldout_rows)
  return spec


def check_run(study: StudyConfig, cell: Cell, seed: int, out: Path) -> None:
  """A run trained with another config than the study's now is an error: never mixed into the tables."""
  from rome_flax.train import trainer
  where = run_dir(out, cell, seed)
  saved = where / "train" / "config.json"
  if saved.is_file():
    differ = trainer.config_differences(json.loads(saved.read_text(encoding="utf-8")), train_config(study, cell, seed, out))
    if differ:
      raise RomeFlaxError(f"{where} was trained with another config (differs in {', '.join(differ)}); "
                          "choose another --output_dir for this study")


def finished(study: StudyConfig, cell: Cell, seed: int, out: Path) -> bool:
  """True when (cell, seed) has its result from this study's config; one evaluated under another
  `eval_spec` is evaluated again (cheap: no training)."""
  check_run(study, cell, seed, out)
  done = run_dir(out, cell, seed) / RESULT_FILE
  return done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("eval") == eval_spec(study, cell)


def run_cell_seed(study: StudyConfig, cell: Cell, seed: int, out: Path, *, time_speed: bool, say) -> dict:
  """Trains one (cell, seed), evaluates it and writes its result.json (returned)."""
  from rome_flax import report
  from rome_flax.engine import evaluation
  from rome_flax.model.pretrained import MultiExitBert
  from rome_flax.train.trainer import resolve_task

  where = run_dir(out, cell, seed)
  cfg = train_config(study, cell, seed, out)
  timing_path = where / TIMING_FILE
  export = Path(cfg.run.output_dir) / "export"
  if not (where / "trained").is_file():
    _train(cfg, timing_path, say)
    files.atomic_write_text(where / "trained", "ok\n")
  if not study.keep_checkpoints:
    shutil.rmtree(Path(cfg.run.output_dir) / "checkpoints", ignore_errors=True)
  task = resolve_task(cfg.data)
  model = MultiExitBert.from_pretrained(str(export))
  sweep = policies(study, model.config)
  say(f"  dev sweep: {len(sweep)} settings")
  common = dict(batch_size=study.eval_batch_size, max_length=cfg.data.max_length, latency_examples=study.latency_examples)
  dev_examples = _examples(task, cfg, "dev")
  dev = evaluation.evaluate_exits(model, task, dev_examples, sweep, measure_speed="none", **common)
  report.write_evaluation(where / "dev", dev, checkpoint=str(export))
  timing = _read_timing(timing_path)
  result = {"cell": cell.name, "seed": seed, "train_seconds": timing["seconds"], "train_attempts": timing["attempts"],
            "eval": eval_spec(study, cell), "dev": _sweep_record(dev)}
  result["train_steps"] = _last_step(Path(cfg.run.output_dir))
  if study.evaluated_on_heldout(cell):
    rows = tuple(study.heldout_rows)
    say(f"  held-out train rows {rows[0]}..{rows[1] - 1}")
    held = evaluation.evaluate_exits(model, task, _examples(task, cfg, "train", rows), sweep[:1], measure_speed="none",
                                     **common)
    result["heldout"] = {**_sweep_record(held), "rows": list(rows)}
  if time_speed:
    chosen = nearest_setting(result["dev"]["settings"], study.speed_ratio)
    policy = next(p for p in sweep if p.describe() == chosen["setting"])
    say(f"  timing {chosen['setting']} (layer ratio {chosen['layer_ratio']:.2f}) against the full model")
    timed = evaluation.evaluate_exits(model, task, dev_examples, [policy], measure_speed="all", **common)
    result["speed"] = {**timed.speed[0], "metric_value": chosen[dev.metric], "metric": dev.metric}
  files.write_json(where / RESULT_FILE, result)
  return result


# ----------------------------------------------------------------------------- the study


def run_study(study: StudyConfig, out: str | Path, *, cells: Optional[Sequence[str]] = None,
              say: Callable[[str], Any] = print, report: bool = True) -> dict:
  """Runs every unfinished (cell, seed), seed by seed (a partial study covers every cell), then
  writes the report. Returns {cell: [result per seed]}."""
  from rome_flax import study_report
  out = Path(out)
  chosen = [study.cell(n) for n in cells] if cells else list(study.cells)
  todo = [(c, s) for s in study.seeds for c in chosen]
  check_before_training(study, chosen, out)
  for i, (cell, seed) in enumerate(todo):
    if finished(study, cell, seed, out):
      continue
    say(f"[{i + 1}/{len(todo)}] {study.name}: {cell.name} seed {seed}")
    run_cell_seed(study, cell, seed, out, time_speed=seed == study.seeds[0], say=say)
  results = collect(study, out)
  if report:
    for path in study_report.write_report(study, results, out):
      say(f"wrote {path}")
  return results


def check_before_training(study: StudyConfig, cells: Sequence[Cell], out: Path) -> None:
  """Every mistake that would otherwise surface after hours of earlier cells: each cell's TrainConfig and
  task, the sweep's criterion and values for that task's labels."""
  from rome_flax.engine import exit_policy as ep
  from rome_flax.kinds.kind import kind_of
  from rome_flax.train.trainer import resolve_task
  for cell in cells:
    cfg = train_config(study, cell, study.seeds[0], out)
    task = resolve_task(cfg.data)
    for delta in study.deltas or (None,):
      for t in study.thresholds:
        ep.make_policy(study.criterion, float(t), 2, num_labels=task.num_labels, kind=kind_of(task), delta=delta)


def collect(study: StudyConfig, out: Path) -> dict:
  """{cell name: [result.json of each finished seed]} (cells with no finished seed are left out)."""
  results = {}
  for cell in study.cells:
    seeds = [s for s in study.seeds if (run_dir(out, cell, s) / RESULT_FILE).is_file()]
    for s in seeds:
      check_run(study, cell, s, out)
    found = [json.loads((run_dir(out, cell, s) / RESULT_FILE).read_text()) for s in seeds]
    stale = [r["seed"] for r in found if r.get("eval") != eval_spec(study, cell)]
    if stale:
      raise RomeFlaxError(f"cell {cell.name}, seed(s) {stale}: evaluated with other sweep settings than the study's "
                          "now; run the study (not --report_only) to evaluate them again (no training)")
    if found:
      results[cell.name] = found
  return results
