"""method.md's reference hyper-parameters for BERT-base on GLUE: lr 2e-5, 3 epochs (RoBERTa: pass
--epochs 10), batch 8, max length 128, seed 42, no weight decay, no warm-up, Adam eps 1e-8, clip 1.0,
linear decay. Pick the task, data and checkpoint on the command line, e.g.
  python train.py --config configs/glue_reference.py --model bert-base-uncased --task rte \
      --data_dir glue_data/RTE --output_dir runs/rte_romebert
"""


def get_config():
  return dict(model="bert-base-uncased", task="sst-2", method="romebert", gr="projection",
              learning_rate=2e-5, epochs=3, batch_size=8, max_length=128, seed=42, weight_decay=0.0,
              warmup_ratio=0.0, adam_eps=1e-8, clip_norm=1.0, gamma=0.9, temperature=3.0,
              kl_reduction="reference", eval_every=0, save_every=1000, output_dir="runs/glue")
