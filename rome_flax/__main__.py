"""`python -m rome_flax convert SRC OUT_DIR [...]`, `python -m rome_flax export-hf --checkpoint EXPORT --out DIR`,
`python -m rome_flax export --checkpoint EXPORT --out DIR` and
`python -m rome_flax study --config F`: package-level commands.

The command lives here, not in convert.py, so the library modules never import their CLI (and
convert.py never imports pretrained.py, which imports it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rome_flax import cli
from rome_flax.io import files
from rome_flax.io.runlock import RunLock

USAGE = ("usage: python -m rome_flax convert SRC OUT_DIR [--num_labels N] [--exit_pooling cls|mean] "
         "[--dtype float32|bfloat16] [--seed N] [--overwrite]\n"
         "       python -m rome_flax export-hf --checkpoint EXPORT_DIR --out DIR [--overwrite]\n"
         "       python -m rome_flax export --checkpoint EXPORT_DIR --out DIR [--slots 256] [--batch 64] "
         "[--sizes 1,4,16,64] [--max_length N] [--criteria entropy,maxprob,patience] [--overwrite]\n"
         "       python -m rome_flax study --config configs/study_sst2.py [--model DIR] [--data_dir DIR] "
         "[--output_dir DIR] [--seeds 0,1,2] [--cells a,b] [--set FIELD=VALUE ...] [--report_only]\n"
         "       python -m rome_flax calibrate --checkpoint EXPORT --target consistency|risk|speed "
         "[--epsilon E] [--delta D] [--speedup S] [--criterion entropy|maxprob|patience|tokee] [--task T] "
         "[--data_dir DIR] [--split train] [--skip_rows N] [--rows N] [--output thresholds.json]\n"
         "       python -m rome_flax serve --checkpoint EXPORT [--host 127.0.0.1] [--port 8080] [--policy entropy:0.3] "
         "[--max_batch 64] [--max_queue 1024] [--timeout_ms MS] [--full_model]")


def convert_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax convert",
                          description="A Hugging Face checkpoint -> a rome_flax export.")
  ap.add_argument("src", help="Hugging Face checkpoint directory or hub id")
  ap.add_argument("out_dir", help="directory to write the rome_flax export to")
  ap.add_argument("--num_labels", type=int, default=None)
  ap.add_argument("--exit_pooling", choices=["cls", "mean"], default=None,
                  help="default: the checkpoint's (an export or export-hf directory), else cls")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--seed", type=int, default=0, help="seed of the new exit classifiers")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
  return ap


def convert(args) -> None:
  from rome_flax.model.pretrained import convert_checkpoint
  out, model = convert_checkpoint(args.src, args.out_dir, num_labels=args.num_labels,
                                  exit_pooling=args.exit_pooling, dtype=args.dtype, seed=args.seed,
                                  overwrite=args.overwrite)
  cfg = model.config
  loaded = model.load_report.summary() if model.load_report is not None else "a rome_flax export, copied as it is"
  print(f"converted {args.src} -> {out} ({cfg.model_type}, {cfg.num_layers} layers, {cfg.num_labels} labels); {loaded}")


def export_hf_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax export-hf",
                          description="A rome_flax export -> a Hugging Face directory (model.safetensors, config.json, "
                          "modeling_rome_flax.py, tokenizer) that PyTorch transformers loads with every exit.")
  ap.add_argument("--checkpoint", required=True, help="rome_flax export directory (train.py's export/, or convert's)")
  ap.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing export-hf directory")
  return ap


def export_hf(args) -> None:
  from rome_flax.model.export_hf import export_hf as run_export
  run_export(args.checkpoint, args.out, overwrite=args.overwrite, say=print)


def export_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax export",
                          description="A rome_flax export -> an artefact that serves without rome_flax: the early-exit "
                          "engine's steps and the full-model / all-exits forwards as jax.export functions for fixed "
                          "shapes, the parameters, the tokenizer, manifest.json and artefact_runtime.py (jax only).")
  ap.add_argument("--checkpoint", required=True, help="rome_flax export directory (train.py's export/, or convert's)")
  ap.add_argument("--out", required=True, help="directory to write the artefact to")
  ap.add_argument("--slots", type=int, default=256, help="examples the engine holds at once")
  ap.add_argument("--batch", type=int, default=64, help="examples a layer batch runs at most")
  ap.add_argument("--sizes", help="batch sizes a step may cut to, and the forwards' batch sizes (default: 1, batch/16, "
                  "batch/4, batch)")
  ap.add_argument("--max_length", type=int, help="pieces per example (default: the export's max_length, else 128)")
  ap.add_argument("--criteria", help="criteria to export (default: every one the task allows; a token task's: tokee "
                  "and its sentence criteria)")
  ap.add_argument("--window", type=int, help="token tasks: TOKEE's window, an odd number of words (default 3)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing artefact directory")
  return ap


def export(args) -> None:
  from rome_flax.engine import artefact
  sizes = artefact.parse_ints(args.sizes, "--sizes") if args.sizes is not None else None
  criteria = [c.strip() for c in args.criteria.split(",") if c.strip()] if args.criteria is not None else None
  artefact.export_artefact(args.checkpoint, args.out, slots=args.slots, batch=args.batch, sizes=sizes,
                           max_length=args.max_length, criteria=criteria, window=args.window,
                           overwrite=args.overwrite, say=print)


def study_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax study",
                          description="Train every (cell, seed) of a study, sweep and time them, write tables and "
                          "plots; a re-run skips finished runs and resumes a killed one.")
  ap.add_argument("--config", required=True, help="study config file (configs/study_*.py)")
  ap.add_argument("--output_dir", help="default: runs/study/<the study's name>")
  ap.add_argument("--model", help="every cell's model (e.g. a local copy of the config's hub checkpoint)")
  ap.add_argument("--data_dir", help="every cell's data directory")
  ap.add_argument("--seeds", help="comma list replacing the config's seeds")
  ap.add_argument("--cells", help="comma list: run only these cells (the report still covers every finished one)")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                  help="a TrainConfig override for every cell (repeatable), e.g. --set train_rows=4000")
  ap.add_argument("--report_only", action="store_true", help="train nothing: rewrite the report from finished runs")
  return ap


def study(args) -> None:
  from rome_flax import study as study_lib
  from rome_flax.errors import RomeFlaxError
  from rome_flax.train import train_config
  overrides = {}
  for item in args.set:
    key, sep, raw = item.partition("=")
    name = train_config.field_name(key.strip())
    if not sep or name is None:
      raise RomeFlaxError(f"--set takes FIELD=VALUE with a TrainConfig field, got {item!r}")
    overrides[name] = train_config.parse_value(name, raw.strip())
  overrides.update({k: v for k, v in (("model", args.model), ("data_dir", args.data_dir)) if v is not None})
  seeds = None
  if args.seeds:
    try:
      seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
      raise RomeFlaxError(f"--seeds takes a comma list of integers, got {args.seeds!r}") from None
  cfg = study_lib.with_overrides(study_lib.load_study_config(args.config), overrides, seeds)
  cells = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None
  unknown = [c for c in cells or () if c not in [x.name for x in cfg.cells]]
  if unknown:
    raise RomeFlaxError(f"--cells: unknown cell(s) {', '.join(unknown)}; the study has "
                        f"{', '.join(c.name for c in cfg.cells)}")
  out = Path(files.check_output_value(args.output_dir) if args.output_dir is not None else f"runs/study/{cfg.name}")
  with RunLock(out):   # one study per directory (each run's own directory is locked by train.py too)
    _study_in(args, study_lib, cfg, cells, out)


def _study_in(args, study_lib, cfg, cells, out: Path) -> None:
  from rome_flax.errors import RomeFlaxError
  if args.report_only:
    from rome_flax import study_report
    results = study_lib.collect(cfg, Path(out))
    if not results:
      raise RomeFlaxError(f"--report_only: {out} holds no finished run of study {cfg.name}")
    for path in study_report.write_report(cfg, results, Path(out)):
      print(f"wrote {path}")
    return
  study_lib.run_study(cfg, out, cells=cells, say=lambda m: print(m, flush=True))


def calibrate_parser() -> cli.ArgumentParser:
  from rome_flax import calibrate_cli
  return calibrate_cli.build_parser()


def calibrate(args) -> None:
  from rome_flax import calibrate_cli
  calibrate_cli.run(args)


def serve_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax serve",
                          description="An HTTP server with early exit and continuous batching at layer granularity "
                          "(POST /predict, GET /health, GET /metrics); SIGTERM drains and exits 0.")
  ap.add_argument("--checkpoint", help="rome_flax export directory (train.py's export/, or convert's)")
  ap.add_argument("--artefact", help="serve an artefact written by python -m rome_flax export instead")
  ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
  ap.add_argument("--port", type=int, default=8080, help="port (0: any free port; the line 'serving on' names it)")
  ap.add_argument("--policy", help="CRITERION:THRESHOLD, e.g. entropy:0.3 or maxprob:0.9, or for a token task "
                  "tokee:0.1 (token-level early exit) or a sentence criterion (SENTEE), or a request's JSON object, e.g. "
                  "'{\"criterion\": \"patience\", \"threshold\": 2, \"delta\": 0.1}' for a regression export "
                  "(default: entropy:0.3, tokee:0.1 for a token task, or the --thresholds_file setting; a regression "
                  "export needs one); requests may change the thresholds")
  ap.add_argument("--window", type=int, help="token tasks: TOKEE's window, an odd number of words (default: 3, or "
                  "the --thresholds_file setting's; an artefact's is fixed at export)")
  ap.add_argument("--thresholds_file", help="a calibrate thresholds.json for this export: the policy 'calibrated'")
  ap.add_argument("--max_batch", type=int, help="rows per layer batch (steps cut it to 1, B/16, B/4 at low load; "
                  "default: 64; an artefact's is fixed at export)")
  ap.add_argument("--slots", type=int, help="examples on the device at once (default: 4 x max_batch; an artefact's is "
                  "fixed at export)")
  ap.add_argument("--max_queue", type=int, default=1024, help="examples that may wait; beyond it: 429")
  ap.add_argument("--timeout_ms", type=float, help="default request deadline; past it: 504 (default: none)")
  ap.add_argument("--max_length", type=int, help="longest input in tokens (default: the export's training length; "
                  "an artefact's is fixed at export)")
  ap.add_argument("--full_model", action="store_true", help="the baseline: every layer, final exit, dynamic batches")
  ap.add_argument("--grace_s", type=float, default=30.0, help="on SIGTERM, time to finish running requests")
  ap.add_argument("--warm_up", choices=("all", "background"), default="all",
                  help="all: compile every shape before serving; background: serve once the whole-slot run is "
                  "compiled and compile the shorter views and the small tier while serving (GET /health says "
                  "\"warm\": true when done; until then steps run over whole slots; --full_model compiles all first)")
  return ap


def serve(args) -> None:
  from rome_flax import server
  from rome_flax.errors import RomeFlaxError
  if not args.checkpoint and not args.artefact:
    raise RomeFlaxError("give --checkpoint EXPORT (or --artefact DIR)")
  if args.checkpoint and args.artefact:
    raise RomeFlaxError("give --checkpoint or --artefact, not both")
  fixed = [f"--{name}" for name in ("max_batch", "slots", "max_length") if getattr(args, name) is not None]
  if args.artefact and fixed:
    raise RomeFlaxError(f"{', '.join(fixed)}: an artefact's batch, slots and length are fixed at export "
                        "(python -m rome_flax export --batch, --slots, --max_length)")
  if not 0 <= args.port <= 65535:
    raise RomeFlaxError(f"--port must be in 0..65535, got {args.port}")
  for name in ("max_batch", "max_queue", "slots", "max_length"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise RomeFlaxError(f"--{name} must be >= 1, got {value}")
  server.serve(args.checkpoint, artefact=args.artefact, host=args.host,
               port=args.port, policy=args.policy, max_batch=args.max_batch, slots=args.slots,
               max_queue=args.max_queue, timeout_ms=args.timeout_ms, full_model=args.full_model,
               max_length=args.max_length, thresholds_file=args.thresholds_file, grace_s=args.grace_s,
               window=args.window, warm_up=args.warm_up)


COMMANDS = {"convert": (convert, convert_parser), "export-hf": (export_hf, export_hf_parser),
            "export": (export, export_parser),
            "study": (study, study_parser), "calibrate": (calibrate, calibrate_parser), "serve": (serve, serve_parser)}


def main(argv=None) -> int:
  from rome_flax.runtime import retain_host_memory
  retain_host_memory()   # before JAX starts its threads, as train.py and infer.py do (MiniLM full model at [1, 32]: 42 -> 27 ms)
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in COMMANDS:
    print(USAGE, file=sys.stderr)
    return cli.EXIT_USER_ERROR
  program, parser = COMMANDS[argv[0]]
  return cli.run(program, parser(), argv[1:])


if __name__ == "__main__":
  raise SystemExit(main())
