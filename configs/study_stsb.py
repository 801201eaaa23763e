"""The STS-B study (issue 14): all-MiniLM-L6-v2, RomeBERT SD+GR (mean pooling) and DeeBERT, 3 seeds,
Pearson / Spearman per exit and the patience (delta) trade-off curve.

Budget: the first 3,000 of the 5,749 STS-B train rows (what fitted the session beside the SST-2 study on 2 CPU
cores), max length 128, batch 8, 1 epoch (DeeBERT: 1 per stage), lr 5e-5. DeeBERT uses cls pooling, the
published baseline, so RomeBERT-vs-DeeBERT differences here mix method and pooling.

  python -m rome_flax study --config configs/study_stsb.py --model MINILM_DIR --data_dir ../shared/glue/STS-B
"""


def get_config():
  return dict(
      name="stsb",
      train=dict(model="sentence-transformers/all-MiniLM-L6-v2", task="sts-b", data_dir="../shared/glue/STS-B",
                 train_rows=3000, max_length=128, batch_size=8, epochs=1, learning_rate=5e-5, eval_every=0, save_every=250,
                 keep_checkpoints=1, log_every=50),
      cells=[
          dict(name="romebert_gr_mean", label="RomeBERT SD+GR (mean)",
               overrides=dict(method="romebert", gr="projection", exit_pooling="mean")),
          dict(name="deebert", label="DeeBERT two-stage (cls)", overrides=dict(method="deebert")),
      ],
      seeds=[0, 1, 2],
      criterion="patience",
      thresholds=[1, 2, 3, 4],
      deltas=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],
      ratios=[1.5, 2.0, 3.0],
      speed_ratio=2.0,
      claims=dict(romebert="romebert_gr_mean", deebert="deebert"),
  )
