"""Early-exit evaluation: threshold sweep, measured speed, GLUE submission files.

  python infer.py --checkpoint runs/default/export --task synthetic --output_dir runs/default/infer
  python infer.py --checkpoint DIR --data_dir ../shared/glue/SST-2 --task sst-2 --split dev \
      --criterion entropy --thresholds 0.05,0.1,0.2 --batch_size 64 --output_dir DIR [--measure_speed]

See rome_flax/infer_cli.py for every option.
"""

import sys

try:   # the libraries take seconds to load; Ctrl-C then is one line too (nothing is written yet)
  from rome_flax.runtime import retain_host_memory

  retain_host_memory()  # before JAX starts its threads: no page faults on every batch's temporaries

  from rome_flax.infer_cli import main
except KeyboardInterrupt:
  print("interrupted", file=sys.stderr)
  sys.exit(130)

if __name__ == "__main__":
  sys.exit(main())
