"""Hugging Face BERT / RoBERTa weights -> rome_flax parameters, without PyTorch or transformers models.

Reads a local directory (config.json + model.safetensors, a sharded safetensors index, or
pytorch_model.bin when torch is installed) or downloads one from the hub. Accepts BertModel,
BertForSequenceClassification, BertForTokenClassification, RobertaModel and
Roberta{Sequence,Token}Classification weights, with or without the `bert.` / `roberta.` prefix, and
what `python -m rome_flax export-hf` writes (every exit, under DeeBERT's `encoder.highway.{i}` names).

The name table below is the one definition of the mapping: `convert_state_dict` reads it (HF -> rome_flax)
and `hf_state_dict` writes it (rome_flax -> HF, the exact inverse).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.model import heads
from rome_flax.model.config import ModelConfig
from rome_flax.model.encoder import init_params, stack_layers

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.txt",
                 "tokenizer*", "special_tokens_map.json", "merges.txt", "vocab.json"]


@dataclasses.dataclass
class LoadReport:
  """What the conversion used, made up, and ignored."""
  missing: list[str]           # rome_flax parameters that the checkpoint did not provide (random init)
  unexpected: list[str]        # checkpoint tensors rome_flax did not use
  classifier_from_checkpoint: bool

  def summary(self) -> str:
    parts = [f"classifier: {'from checkpoint' if self.classifier_from_checkpoint else 'new (random init)'}"]
    parts.append(f"missing (random init): {', '.join(self.missing) if self.missing else 'none'}")
    if self.unexpected:
      shown = ", ".join(self.unexpected[:8]) + (f" ... (+{len(self.unexpected) - 8})" if len(self.unexpected) > 8 else "")
      parts.append(f"unused checkpoint weights ({len(self.unexpected)}): {shown}")
    else:
      parts.append("unused checkpoint weights: none")
    return "; ".join(parts)


def resolve_checkpoint_dir(path_or_id: str, revision: Optional[str] = None) -> Path:
  """A local directory as is; anything else is treated as a hub id and downloaded (cached)."""
  p = Path(os.path.expanduser(str(path_or_id)))
  if p.is_dir():
    return p
  if p.exists():
    raise RomeFlaxError(f"{path_or_id} is a file; pass the checkpoint directory that holds config.json")
  looks_local = str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1
  if looks_local:
    raise RomeFlaxError(f"checkpoint directory {path_or_id} does not exist")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id=str(path_or_id), revision=revision, allow_patterns=_HUB_PATTERNS))
  except Exception as e:  # offline, unknown repo, auth: all reach the user as one line
    raise RomeFlaxError(
        f"{path_or_id!r} is not a local directory and could not be downloaded from the hub "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
        "check the id or your connection, or pass a local directory") from None


# config.json of an export-hf directory: {"format": ..., "metadata": ExportInfo's dict} (what the export said).
HF_EXPORT_KEY = "rome_flax_export"


def read_hf_config(ckpt_dir: Path) -> dict:
  cfg_path = ckpt_dir / "config.json"
  if not cfg_path.is_file():
    raise RomeFlaxError(f"{ckpt_dir} has no config.json: not a Hugging Face checkpoint directory")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise RomeFlaxError(f"{cfg_path} is not valid JSON ({e})") from None


def load_state_dict(ckpt_dir: Path) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint as float32 NumPy arrays keyed by their PyTorch names."""
  if (ckpt_dir / "model.safetensors").is_file():
    return _load_safetensors([ckpt_dir / "model.safetensors"])
  if (ckpt_dir / "model.safetensors.index.json").is_file():
    return _load_safetensors(_shards(ckpt_dir / "model.safetensors.index.json"))
  for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
    if (ckpt_dir / name).is_file():
      files = [ckpt_dir / name] if name.endswith(".bin") else _shards(ckpt_dir / name)
      return _load_torch_bins(files)
  raise RomeFlaxError(f"{ckpt_dir} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _shards(index_path: Path) -> list[Path]:
  try:
    weight_map = json.loads(index_path.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError) as e:
    raise RomeFlaxError(f"{index_path} is not a valid shard index ({e})") from None
  files = [index_path.parent / f for f in sorted(set(weight_map.values()))]
  for f in files:
    if not f.is_file():
      raise RomeFlaxError(f"shard {f} listed in {index_path.name} is missing")
  return files


def _load_safetensors(files) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  out = {}
  for f in files:
    try:
      tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
      # bf16 tensors cannot be read by the numpy backend: go through torch if it is there.
      if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
        tensors = _load_safetensors_torch(f)
      else:
        raise RomeFlaxError(f"cannot read {f}: {e}") from None
    out.update({k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()})
  return out


def _load_safetensors_torch(f):
  try:
    import torch  # noqa: F401
    from safetensors.torch import load_file
  except ImportError:
    raise RomeFlaxError(f"{f} stores bfloat16 weights; install torch to convert it") from None
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in load_file(str(f)).items()}


def _load_torch_bins(files) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise RomeFlaxError(f"{files[0]} is a PyTorch file: install torch (pip install torch) to read it, "
                        "or convert the checkpoint to safetensors") from None
  out = {}
  for f in files:
    try:
      sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
      raise RomeFlaxError(f"cannot read {f}: {e}") from None
    out.update({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()})
  return out


# ----------------------------------------------------------------------------- name mapping

_PREFIXES = ("bert.", "roberta.", "model.")
_IGNORED = re.compile(r"(position_ids|\.num_batches_tracked)$")


# The name table: Hugging Face names without the `bert.` / `roberta.` prefix. PyTorch's [out, in] weight
# matrices are also ours (layers.Linear): nothing is transposed either way.
EMBEDDINGS = (("word", "embeddings.word_embeddings.weight"), ("position", "embeddings.position_embeddings.weight"),
              ("token_type", "embeddings.token_type_embeddings.weight"))
EMBEDDING_NORM = "embeddings.LayerNorm"
QKV = ("query", "key", "value")   # attention.self.{name}: the row blocks of our fused qkv kernel, in this order
LAYER_LINEARS = (("attention_out", "attention.output.dense"), ("intermediate", "intermediate.dense"),
                 ("output", "output.dense"))
LAYER_NORMS = (("attention_ln", "attention.output.LayerNorm"), ("output_ln", "output.LayerNorm"))
POOLER = "pooler.dense"        # the final exit's pooler (BertModel's own)
CLASSIFIER = "classifier"      # the final exit's classifier (a *For*Classification model's head, unprefixed)


def layer_prefix(i: int) -> str:
  return f"encoder.layer.{i}."


def highway_prefix(i: int) -> str:
  """Exit i + 1 < L (0-based i), DeeBERT's names: `{prefix}pooler.dense` (sequence head) and `{prefix}classifier`."""
  return f"encoder.highway.{i}."


def _strip(name: str) -> str:
  for p in _PREFIXES:
    if name.startswith(p):
      return name[len(p):]
  return name


def _ln(sd, base):
  """LayerNorm weights under either the modern (weight/bias) or TF-era (gamma/beta) names."""
  for w, b in (("weight", "bias"), ("gamma", "beta")):
    if f"{base}.{w}" in sd:
      return sd.pop(f"{base}.{w}"), sd.pop(f"{base}.{b}")
  raise KeyError(f"{base}.weight")


def convert_state_dict(state_dict: dict[str, np.ndarray], cfg: ModelConfig, rng=None,
                       classifier_rows: Optional[np.ndarray] = None):
  """Maps a (prefix-stripped or not) HF state dict onto rome_flax parameters.

  Returns (params, LoadReport). Everything the checkpoint lacks keeps its random init.
  classifier_rows: for a token head, the checkpoint classifier's row of each of our labels (its
  id2label read against our tag set, `classifier_order`); None: the rows as they are.
  """
  sd = {_strip(k): v for k, v in state_dict.items() if not _IGNORED.search(k)}
  params = init_params(cfg, jax.random.PRNGKey(0) if rng is None else rng, host=True)   # what the checkpoint lacks keeps this init
  missing: list[str] = []
  L, D = cfg.num_layers, cfg.hidden_size

  def take(name, expect_shape):
    """A weight as stored: PyTorch's [out, in] matrices are also ours (model.Linear)."""
    if name not in sd:
      missing.append(name)
      return None
    w = sd.pop(name)
    if tuple(w.shape) != tuple(expect_shape):
      raise RomeFlaxError(f"checkpoint weight {name} has shape {tuple(w.shape)} but the config implies "
                          f"{tuple(expect_shape)}: config.json and the weights do not match")
    return w

  def put(tree, key, value):
    if value is not None:
      tree[key] = np.asarray(value, np.float32)

  emb = params["embeddings"]
  for ours, theirs in EMBEDDINGS:
    put(emb[ours], "embedding", take(theirs, emb[ours]["embedding"].shape))
  _put_ln(sd, EMBEDDING_NORM, emb["ln"]["ln"], missing, D)

  lay = params["layers"]
  for i in range(L):
    pre = layer_prefix(i)
    q = [take(pre + f"attention.self.{n}.weight", (D, D)) for n in QKV]
    qb = [take(pre + f"attention.self.{n}.bias", (D,)) for n in QKV]
    if all(x is not None for x in q + qb):
      lay["qkv"]["kernel"][i] = np.concatenate(q, axis=0)
      lay["qkv"]["bias"][i] = np.concatenate(qb)
    for ours, theirs in LAYER_LINEARS:
      shape = lay[ours]["kernel"].shape[1:]
      w = take(pre + theirs + ".weight", shape)
      b = take(pre + theirs + ".bias", shape[:1])
      if w is not None:
        lay[ours]["kernel"][i] = w
      if b is not None:
        lay[ours]["bias"][i] = b
    for ours, theirs in LAYER_NORMS:
      ln_i = {"scale": lay[ours]["ln"]["scale"][i], "bias": lay[ours]["ln"]["bias"][i]}
      _put_ln(sd, pre + theirs, ln_i, missing, D)
      lay[ours]["ln"]["scale"][i], lay[ours]["ln"]["bias"][i] = ln_i["scale"], ln_i["bias"]

  # Pooler: BertModel's pooler, or RobertaForSequenceClassification's classifier.dense (same role).
  ex = params["exits"]
  pool_name = POOLER if f"{POOLER}.weight" in sd else (
      "classifier.dense" if "classifier.dense.weight" in sd else POOLER)
  has_pooler = "pooler" in ex   # a token head has none (the checkpoint's pooler stays unused)
  pw = take(pool_name + ".weight", (D, D)) if has_pooler else None
  pb = take(pool_name + ".bias", (D,)) if has_pooler else None
  if pw is not None and pb is not None:
    ex["pooler"]["kernel"][:] = pw   # every exit pooler starts as a copy of the pretrained one
    ex["pooler"]["bias"][:] = pb

  # Final exit classifier: kept when the checkpoint has one with the same label count.
  cls_name = "classifier.out_proj" if "classifier.out_proj.weight" in sd else CLASSIFIER
  classifier_from_checkpoint = False
  tags = heads.head_kind(cfg).classifier_rows_are_tags   # a token head's rows: the task's tag set
  if f"{cls_name}.weight" in sd:
    cw, cb = sd[f"{cls_name}.weight"], sd[f"{cls_name}.bias"]
    if tags and cw.shape[0] != cfg.num_labels:
      raise RomeFlaxError(f"the checkpoint's token classifier has {cw.shape[0]} labels, the task has "
                          f"{cfg.num_labels}: use the checkpoint's encoder alone (a copy without "
                          f"{cls_name}.*) or a task with its tag set")
    if tags and classifier_rows is not None:
      cw, cb = cw[classifier_rows], cb[classifier_rows]
    if cw.shape == (cfg.num_labels, D):
      ex["classifier"]["kernel"][L - 1] = cw
      ex["classifier"]["bias"][L - 1] = cb
      classifier_from_checkpoint = True
      del sd[f"{cls_name}.weight"], sd[f"{cls_name}.bias"]

  # The other exits, where the checkpoint has them (an export-hf directory): they replace the copies above.
  for i in range(L - 1):
    for part in ((POOLER,) if has_pooler else ()) + (CLASSIFIER,):
      name = highway_prefix(i) + part
      if f"{name}.weight" not in sd:
        continue
      tree = ex["pooler"] if part == POOLER else ex["classifier"]
      if part == CLASSIFIER and sd[f"{name}.weight"].shape[0] != cfg.num_labels and not tags:
        continue   # another label count: a new classifier, as for the final exit (the checkpoint's stays unused)
      w, b = take(name + ".weight", tree["kernel"].shape[1:]), take(name + ".bias", tree["bias"].shape[1:])
      if part == CLASSIFIER and tags and classifier_rows is not None:
        w, b = w[classifier_rows], b[classifier_rows]
      tree["kernel"][i], tree["bias"][i] = w, b
  params = jax.tree.map(np.asarray, params)
  return params, LoadReport(missing=missing, unexpected=sorted(sd), classifier_from_checkpoint=classifier_from_checkpoint)


def _put_ln(sd, base, tree, missing, dim):
  try:
    w, b = _ln(sd, base)
  except KeyError:
    missing.append(base)
    return
  if w.shape != (dim,):
    raise RomeFlaxError(f"checkpoint weight {base} has shape {w.shape}, config implies ({dim},)")
  tree["scale"], tree["bias"] = w, b


def hf_state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """rome_flax parameters -> PyTorch tensors' names and values (float32, C-contiguous): the exact inverse of
  `convert_state_dict`, by the same name table. The encoder and the final exit's pooler under the model's
  prefix (`bert.` / `roberta.`), the final classifier as `classifier`, exits 1..L-1 under
  `{prefix}encoder.highway.{i}` (a token head has no pooler)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), stack_layers(jax.device_get(params)))
  pre, out = f"{cfg.model_type}.", {}

  def put(name, value):
    out[name] = np.ascontiguousarray(value, np.float32)

  emb = p["embeddings"]
  for ours, theirs in EMBEDDINGS:
    put(pre + theirs, emb[ours]["embedding"])
  put(f"{pre}{EMBEDDING_NORM}.weight", emb["ln"]["ln"]["scale"])
  put(f"{pre}{EMBEDDING_NORM}.bias", emb["ln"]["ln"]["bias"])
  lay, L = p["layers"], cfg.num_layers
  for i in range(L):
    lp = pre + layer_prefix(i)
    for n, w, b in zip(QKV, np.split(lay["qkv"]["kernel"][i], 3, axis=0), np.split(lay["qkv"]["bias"][i], 3)):
      put(f"{lp}attention.self.{n}.weight", w)
      put(f"{lp}attention.self.{n}.bias", b)
    for ours, theirs in LAYER_LINEARS:
      put(f"{lp}{theirs}.weight", lay[ours]["kernel"][i])
      put(f"{lp}{theirs}.bias", lay[ours]["bias"][i])
    for ours, theirs in LAYER_NORMS:
      put(f"{lp}{theirs}.weight", lay[ours]["ln"]["scale"][i])
      put(f"{lp}{theirs}.bias", lay[ours]["ln"]["bias"][i])
  ex = p["exits"]
  for i in range(L):
    final = i == L - 1
    if "pooler" in ex:
      name = pre + (POOLER if final else highway_prefix(i) + POOLER)
      put(f"{name}.weight", ex["pooler"]["kernel"][i])
      put(f"{name}.bias", ex["pooler"]["bias"][i])
    name = CLASSIFIER if final else pre + highway_prefix(i) + CLASSIFIER
    put(f"{name}.weight", ex["classifier"]["kernel"][i])
    put(f"{name}.bias", ex["classifier"]["bias"][i])
  return out


def classifier_order(hf: dict, label_names) -> Optional[np.ndarray]:
  """For each of our label names, the row of a checkpoint's classifier that scores it, read from its
  config's id2label; None when id2label does not name exactly our labels (generic LABEL_k names:
  the rows are taken in their order)."""
  id2label = hf.get("id2label") or {}
  try:
    theirs = {str(name): int(i) for i, name in id2label.items()}
  except (TypeError, ValueError):
    return None
  if not label_names or set(theirs) != set(label_names):
    return None
  return np.asarray([theirs[name] for name in label_names])


def load_hf_checkpoint(path_or_id: str, *, num_labels: Optional[int] = None, exit_pooling: Optional[str] = None,
                       dtype: str = "float32", seed: int = 0, revision: Optional[str] = None,
                       head: Optional[str] = None, label_names=None, classifier_dropout: Optional[float] = None):
  """Returns (ModelConfig, params, LoadReport, checkpoint_dir). head='token' (with the task's
  label_names) loads a token classifier's head as the final exit, matching its labels by name.
  exit_pooling and head default to what config.json says (`exit_pooling`, `exit_head`: an export-hf
  directory), else 'cls' and 'sequence'."""
  ckpt_dir = resolve_checkpoint_dir(path_or_id, revision)
  hf = read_hf_config(ckpt_dir)
  head = head or hf.get("exit_head") or "sequence"
  overrides = dict(exit_pooling=exit_pooling or hf.get("exit_pooling") or "cls", dtype=dtype, head=head)
  if classifier_dropout is not None:
    overrides["classifier_dropout"] = classifier_dropout
  if num_labels is not None:
    overrides["num_labels"] = num_labels
  elif "id2label" not in hf:
    overrides["num_labels"] = 2
  cfg = ModelConfig.from_hf_dict(hf, **overrides)
  state_dict = load_state_dict(ckpt_dir)
  rows = classifier_order(hf, label_names) if head == "token" else None
  params, report = convert_state_dict(state_dict, cfg, jax.random.PRNGKey(seed), classifier_rows=rows)
  core_missing = [m for m in report.missing if not m.startswith(("pooler", "classifier"))]
  if len(core_missing) > len(report.missing) // 2 and len(core_missing) > 4 and not any(
      k for k in map(_strip, state_dict) if k.startswith("encoder.layer.")):
    raise RomeFlaxError(f"{ckpt_dir}: no BERT/RoBERTa encoder weights found (first missing: {core_missing[0]})")
  return cfg, params, report, ckpt_dir
