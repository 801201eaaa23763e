"""`python -m rome_flax convert SRC OUT_DIR [...]`: package-level commands."""

import sys


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in ("convert",):
    print("usage: python -m rome_flax convert SRC OUT_DIR [--num_labels N] [--exit_pooling cls|mean] "
          "[--dtype float32|bfloat16] [--overwrite]", file=sys.stderr)
    return 2
  from rome_flax.convert import main as convert_main
  return convert_main(argv[1:])


if __name__ == "__main__":
  raise SystemExit(main())
