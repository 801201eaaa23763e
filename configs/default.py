"""The README's main job: the embedded synthetic task on a small random 4-layer BERT (a few minutes, offline)."""


def get_config():
  return dict(task="synthetic", model=None, method="romebert", gr="projection",
              learning_rate=1e-3, epochs=4, batch_size=32, max_length=32, warmup_ratio=0.1,
              output_dir="runs/default", log_every=25, save_every=125)
