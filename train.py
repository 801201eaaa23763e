"""Train a multi-exit BERT with RomeBERT's GR-SD or a baseline.

  python train.py                                    # configs/default.py: synthetic task, small model, minutes
  python train.py --config configs/sst2_minilm.py --method deebert --output_dir runs/sst2_deebert
  python train.py --output_dir runs/sst2 --resume            # continue a killed run with its own config

Every TrainConfig field is a flag (`--learning_rate 5e-5`, or by group `--optim.learning_rate 5e-5`);
see rome_flax/train/train_config.py.

SIGTERM or Ctrl-C finishes the step in flight, saves a checkpoint and exits with code 3 (`--resume`
continues exactly); bad input exits with code 2 and one `error:` line (`--debug` adds the traceback).
One run at a time per output_dir (rome_flax.lock).
"""

from __future__ import annotations

import os
import signal
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def build_parser():
  from rome_flax import cli
  from rome_flax.train import train_config
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", help="config file defining get_config() -> dict of overrides "
                      "(default: configs/default.py)")
  parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
  parser.add_argument("--overwrite", action="store_true", help="replace the rome_flax run in output_dir (never "
                      "other files: a directory holding anything else is refused); the old run is put back if the "
                      "new one ends before its first checkpoint")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (>= 1), with a "
                      "checkpoint and an export; --resume continues")
  defaults = train_config.read_config_dict(DEFAULT_CONFIG)   # what a run without --config starts from
  base = train_config.TrainConfig().to_dict()
  changed = {k: f"; configs/default.py: {'none' if v is None else v}" for k, v in defaults.items() if v != base[k]}
  types = train_config.field_types()
  groups = {}
  for name in train_config.field_names():
    group = train_config.dotted_name(name).split(".")[0]
    if group not in groups:
      groups[group] = parser.add_argument_group(f"{group} options (TrainConfig.{group})")
    groups[group].add_argument(f"--{name}", f"--{group}.{name}", dest=f"set_{name}", default=None,
                               metavar=types[name].__name__.upper().replace("TUPLE", "LIST"),
                               help=train_config.field_help(name, changed.get(name, "")))
  return parser


def run(args) -> None:
  from pathlib import Path
  from rome_flax.train import train_config, trainer
  cfg = train_config.load_config_file(args.config or DEFAULT_CONFIG)
  overrides = {k[4:]: train_config.parse_value(k[4:], v) for k, v in vars(args).items()
               if k.startswith("set_") and v is not None}
  cfg = cfg.replace(**overrides)
  if args.resume:   # the run's own config; what --config and the flags name must agree with it (trainer.RUN_OWNED aside)
    given = {train_config.field_name(k) or k: v for k, v in
             (train_config.read_config_dict(args.config) if args.config else {}).items()}
    given.update(overrides)
    given.pop("output_dir", None)
    cfg = trainer.resume_config(Path(cfg.run.output_dir).absolute(), given) or cfg
  trainer.train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                max_steps=args.max_steps)


def main(argv=None) -> int:
  from rome_flax.runtime import retain_host_memory
  retain_host_memory()  # before JAX starts its threads: no page faults on every step's temporaries
  from rome_flax import cli
  return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})   # until cli.run takes them (preemption.py)
  sys.exit(main())
