"""The STS-B study (issues 14 and 22): all-MiniLM-L6-v2, mean pooling, 4 cells x 3 seeds, Pearson / Spearman per
exit and the patience (delta) trade-off curve.

Every cell trains on standardised targets (`regression_targets="standardize"`, the default since issue 22: the
exits learn (y - mean) / std of the train labels; the published raw targets are `regression_targets="raw"`, whose
collapse the first STS-B study measured). Every cell uses mean pooling, so differences between cells are the
method's alone.

Budget: the first 3,000 of the 5,749 STS-B train rows (the first study's budget; a run with its dev sweep takes 6-9
minutes on 2 CPU cores), max length 128, batch 8, 1 epoch (DeeBERT: 1 per stage), lr 5e-5. Four cells: RomeBERT
SD+GR, RomeBERT SD only (is GR needed on regression?), DeeBERT two-stage and final_only.

  python -m rome_flax study --config configs/study_stsb.py --model MINILM_DIR --data_dir ../shared/glue/STS-B
"""


def get_config():
  return dict(
      name="stsb",
      train=dict(model="sentence-transformers/all-MiniLM-L6-v2", task="sts-b", data_dir="../shared/glue/STS-B",
                 train_rows=3000, max_length=128, batch_size=8, epochs=1, learning_rate=5e-5, eval_every=0, save_every=250,
                 keep_checkpoints=1, log_every=50, exit_pooling="mean", regression_targets="standardize"),
      cells=[
          dict(name="romebert_gr_mean", label="RomeBERT SD+GR (mean)",
               overrides=dict(method="romebert", gr="projection")),
          dict(name="deebert_mean", label="DeeBERT two-stage (mean)", overrides=dict(method="deebert")),
          dict(name="final_only_mean", label="final_only (mean)", overrides=dict(method="final_only")),
          dict(name="romebert_sd_mean", label="RomeBERT SD only (mean)", overrides=dict(method="romebert", gr="none")),
      ],
      seeds=[0, 1, 2],
      criterion="patience",
      thresholds=[1, 2, 3, 4],
      deltas=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],
      ratios=[1.5, 2.0, 3.0],
      speed_ratio=2.0,
      claims=dict(romebert="romebert_gr_mean", romebert_sd="romebert_sd_mean", deebert="deebert_mean",
                  final_only="final_only_mean"),
  )
