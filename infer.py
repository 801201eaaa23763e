"""Early-exit evaluation: threshold sweep, measured speed, GLUE submission files.

  python infer.py --checkpoint runs/default/export --task synthetic --output_dir runs/default/infer
  python infer.py --checkpoint DIR --data_dir ../shared/glue/SST-2 --task sst-2 --split dev \
      --criterion entropy --thresholds 0.05,0.1,0.2 --batch_size 64 --output_dir DIR [--measure_speed]

See rome_flax/infer_cli.py for every option.
"""

import signal
import sys

if __name__ == "__main__":   # SIGINT / SIGTERM wait while the libraries load; cli.run takes them (preemption.py)
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from rome_flax.runtime import retain_host_memory  # noqa: E402

retain_host_memory()  # before JAX starts its threads: no page faults on every batch's temporaries

from rome_flax.infer_cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
