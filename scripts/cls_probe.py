"""Do the lower layers of a checkpoint carry the task in their CLS state? (issue 22, item 3)

A linear probe (logistic regression on standardised frozen features, no fine-tuning) of layer l's CLS state
and of its masked-mean state, for every layer, trained on SST-2 train rows and scored on dev: is the task in
the state at all? Then what an exit head is fed: the across-example spread of tanh(pooler(state)) on dev,
through the checkpoint's pooler (what every exit starts from) and through a fresh N(0, 0.02) pooler. A state
that carries the task but whose spread is ~0 through either pooler starts every exit at a constant input,
whatever the head's init: the checkpoint's doing (all-MiniLM-L6-v2 was trained as a mean-pooled encoder).

  python scripts/cls_probe.py --model MINILM_DIR --data_dir ../shared/glue/SST-2 --train_rows 4000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(model, texts, max_length: int, batch: int = 64):
  """[layers + 1, N, D] CLS states and masked-mean states, embeddings first."""
  cls_, mean_ = [], []
  for i in range(0, len(texts), batch):
    enc = model.tokenizer(list(texts[i:i + batch]), padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="np", return_token_type_ids=True)   # one shape: one compile
    enc = {k: np.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    h_LxBxSxD = np.asarray(model(**enc, output_hidden_states=True).hidden_states)
    m_BxSx1 = enc["attention_mask"][..., None].astype(np.float32)
    cls_.append(h_LxBxSxD[:, :, 0])
    mean_.append((h_LxBxSxD * m_BxSx1).sum(2) / m_BxSx1.sum(1))
  return np.concatenate(cls_, 1), np.concatenate(mean_, 1)


def probe(x_tr, y_tr, x_te, y_te, seed: int) -> float:
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  scaler = StandardScaler().fit(x_tr)
  clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(scaler.transform(x_tr), y_tr)
  return 100.0 * clf.score(scaler.transform(x_te), y_te)


def main() -> None:
  from bench._common import cpu_model
  from rome_flax.kinds import data, tasks
  from rome_flax.model.pretrained import MultiExitBert
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--train_rows", type=int, default=4000)
  ap.add_argument("--max_length", type=int, default=64)
  ap.add_argument("--seeds", default="0,1,2", help="train-row draws: each seed probes a different random subset")
  args = ap.parse_args()
  model = MultiExitBert.from_pretrained(args.model, num_labels=2)
  task = tasks.get_task("sst-2")
  train = data.load_split(task, "train", args.data_dir)
  dev = data.load_split(task, "dev", args.data_dir)
  print(cpu_model())
  dev_cls, dev_mean = features(model, list(dev.texts_a), args.max_length)
  rows = {"cls": [], "mean": []}
  for seed in [int(s) for s in args.seeds.split(",")]:
    pick = np.random.default_rng(seed).choice(len(train.labels), args.train_rows, replace=False)
    tr_cls, tr_mean = features(model, [train.texts_a[i] for i in pick], args.max_length)
    y = train.labels[pick]
    for name, tr, te in (("cls", tr_cls, dev_cls), ("mean", tr_mean, dev_mean)):
      rows[name].append([probe(tr[l], y, te[l], dev.labels, seed) for l in range(1, tr.shape[0])])
  layers = len(rows["cls"][0])
  print(f"linear probe, SST-2 dev accuracy (majority class {100 * max(dev.labels.mean(), 1 - dev.labels.mean()):.1f}), "
        f"{args.train_rows} train rows, seeds {args.seeds}")
  print("| state | " + " | ".join(f"layer {l + 1}" for l in range(layers)) + " |")
  print("|---|" + "---|" * layers)
  for name, r in rows.items():
    a = np.asarray(r)
    print(f"| {name} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(a.mean(0), a.std(0, ddof=1))) + " |")
  w = np.asarray(model.params["exits"]["pooler"]["kernel"][0], np.float64)   # [out, in], every exit's start
  b = np.asarray(model.params["exits"]["pooler"]["bias"][0], np.float64)
  fresh = np.random.default_rng(0).normal(0.0, 0.02, w.shape)
  spread = lambda x, k, c: float(np.tanh(x @ k.T + c).std(0).mean())   # mean over units of the std over examples
  print("\nwhat an exit head sees on dev: across-example std of tanh(pooler(state)), mean over units")
  print("| state, pooler | " + " | ".join(f"layer {l + 1}" for l in range(layers)) + " |")
  print("|---|" + "---|" * layers)
  for name, feats in (("cls", dev_cls), ("mean", dev_mean)):
    for pooler, (k, c) in (("checkpoint's", (w, b)), ("fresh", (fresh, 0.0))):
      print(f"| {name}, {pooler} | " + " | ".join(f"{spread(feats[l], k, c):.3f}" for l in range(1, feats.shape[0])) + " |")


if __name__ == "__main__":
  main()
