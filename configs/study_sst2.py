"""The SST-2 study (issue 14): all-MiniLM-L6-v2, 7 cells x 3 seeds, plus two recipe candidates (3 seeds each).

Budget: the first 8,000 SST-2 train rows (issue 3's reference budget; the issue's 16,000 rows would take
21 x ~8 min ~ 2.9 h on the project's 2 CPU cores, more than a session), max length 64, batch 8, 1 epoch
(DeeBERT: 1 per stage), lr 5e-5. The recipe is chosen on train rows 60,000..61,999, which no cell trains on.

  python -m rome_flax study --config configs/study_sst2.py --model MINILM_DIR --data_dir ../shared/glue/SST-2
"""

# Entropy in nats (at most ln 2 = 0.693 for two labels); dense near ln 2, where the exits that learned little
# (near-uniform probabilities) start to let examples through.
ENTROPIES = [0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.35,
             0.4, 0.45, 0.5, 0.55, 0.6, 0.63, 0.65, 0.66, 0.67, 0.675, 0.68, 0.685, 0.688, 0.69, 0.691, 0.692,
             0.6925, 0.693, 0.7]


def get_config():
  romebert = dict(method="romebert", gr="projection")
  return dict(
      name="sst2",
      train=dict(model="sentence-transformers/all-MiniLM-L6-v2", task="sst-2", data_dir="../shared/glue/SST-2",
                 train_rows=8000, max_length=64, batch_size=8, epochs=1, learning_rate=5e-5, eval_every=0,
                 save_every=250, keep_checkpoints=1, log_every=50),
      cells=[
          dict(name="romebert_gr", label="RomeBERT SD+GR (cls)", overrides=romebert),
          dict(name="romebert_sd", label="RomeBERT SD only (cls)", overrides=dict(method="romebert", gr="none")),
          dict(name="deebert", label="DeeBERT two-stage (cls)", overrides=dict(method="deebert")),
          dict(name="pabee", label="PABEE weighted (cls)", overrides=dict(method="pabee")),
          dict(name="final_only", label="final_only (cls)", overrides=dict(method="final_only")),
          dict(name="romebert_gr_mean", label="RomeBERT SD+GR (mean)", overrides=dict(romebert, exit_pooling="mean")),
          dict(name="deebert_mean", label="DeeBERT two-stage (mean)", overrides=dict(method="deebert", exit_pooling="mean")),
          # The recipe candidates (section "Recipe"). First, RomeBERT SD+GR (cls) with the highway group weighted as the
          # final exit's single term (5 highways x 0.2). GR's own share of the gap is read off romebert_sd (no
          # projection at all) beside romebert_gr, so no "protect final" candidate is trained.
          dict(name="recipe_equal_groups", label="RomeBERT SD+GR, highway_weight 0.2 (cls)",
               overrides=dict(romebert, highway_weight=0.2)),
          # The second: the new exit heads at 4x the encoder's learning rate (2e-4 vs 5e-5), so the random heads
          # settle before they drag the encoder.
          dict(name="recipe_head_lr", label="RomeBERT SD+GR, heads at 4x lr (cls)",
               overrides=dict(romebert, learning_rate=2e-4, encoder_lr_scale=0.25)),
      ],
      seeds=[0, 1, 2],
      criterion="entropy",
      thresholds=ENTROPIES,
      ratios=[1.5, 2.0, 3.0],
      speed_ratio=2.0,
      heldout_rows=[60000, 62000],
      plot_cells=["romebert_gr", "romebert_sd", "deebert", "pabee", "final_only", "romebert_gr_mean", "deebert_mean"],
      heldout_cells=["romebert_gr", "recipe_equal_groups", "recipe_head_lr"],
      claims=dict(romebert="romebert_gr", romebert_sd="romebert_sd", deebert="deebert", final_only="final_only"),
      recipe=dict(published="romebert_gr", candidates=["recipe_equal_groups", "recipe_head_lr"],
                  max_mean_exits_drop=1.0),
  )
