"""`python -m rome_flax convert SRC OUT_DIR [...]`: package-level commands.

The command lives here, not in convert.py, so the library modules never import their CLI (and
convert.py never imports pretrained.py, which imports it).
"""

from __future__ import annotations

import sys

from rome_flax import cli

USAGE = ("usage: python -m rome_flax convert SRC OUT_DIR [--num_labels N] [--exit_pooling cls|mean] "
         "[--dtype float32|bfloat16] [--seed N] [--overwrite]")


def convert_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax convert",
                          description="A Hugging Face checkpoint -> a rome_flax export.")
  ap.add_argument("src", help="Hugging Face checkpoint directory or hub id")
  ap.add_argument("out_dir", help="directory to write the rome_flax export to")
  ap.add_argument("--num_labels", type=int, default=None)
  ap.add_argument("--exit_pooling", choices=["cls", "mean"], default="cls")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  ap.add_argument("--seed", type=int, default=0, help="seed of the new exit classifiers")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
  return ap


def convert(args) -> None:
  from rome_flax.pretrained import convert_checkpoint
  out, model = convert_checkpoint(args.src, args.out_dir, num_labels=args.num_labels,
                                  exit_pooling=args.exit_pooling, dtype=args.dtype, seed=args.seed,
                                  overwrite=args.overwrite)
  cfg = model.config
  print(f"converted {args.src} -> {out} ({cfg.model_type}, {cfg.num_layers} layers, {cfg.num_labels} labels); "
        f"{model.load_report.summary()}")


COMMANDS = {"convert": (convert, convert_parser)}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in COMMANDS:
    print(USAGE, file=sys.stderr)
    return cli.EXIT_USER_ERROR
  program, parser = COMMANDS[argv[0]]
  return cli.run(program, parser(), argv[1:])


if __name__ == "__main__":
  raise SystemExit(main())
