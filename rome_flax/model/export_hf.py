"""A rome_flax export -> a Hugging Face directory that PyTorch transformers loads (`python -m rome_flax export-hf`).

What the directory holds:
  - `model.safetensors`: every parameter under PyTorch BERT / RoBERTa names (`convert.hf_state_dict`, the
    inverse of the loader's name table): the encoder and the final exit's pooler as BertModel's /
    RobertaModel's, the final classifier as `classifier`, exits 1..L-1 under DeeBERT's
    `{bert|roberta}.encoder.highway.{i}.pooler.dense` / `.classifier` (a token head has no pooler);
  - `config.json`: the architecture, `id2label` / `label2id`, `problem_type`, the exit settings (`exit_head`,
    `exit_pooling`, `regression_mean`, `regression_std`), the export's metadata (`rome_flax_export`) and
    `auto_map` into
  - `modeling_rome_flax.py` (this package's file of that name, copied): needs torch and transformers only;
  - the export's tokenizer files, copied.

`AutoModelFor{Sequence,Token}Classification.from_pretrained(DIR, trust_remote_code=True)` gives every exit;
`AutoModel.from_pretrained(DIR)` the plain backbone; `MultiExitBert.from_pretrained(DIR)` the same parameters
bit for bit. The directory follows the output rules of files.py (kind "export-hf", locked, staged, swapped in).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from rome_flax.errors import RomeFlaxError
from rome_flax.io import files, preemption
from rome_flax.io.runlock import RunLock
from rome_flax.model import heads
from rome_flax.model.config import ModelConfig
from rome_flax.model.convert import HF_EXPORT_KEY, hf_state_dict
from rome_flax.model.pretrained import EXPORT_CONFIG, ExportInfo, MultiExitBert

KIND = "export-hf"
FORMAT = "rome_flax-hf/1"
MODELING_FILE = "modeling_rome_flax.py"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json", "*.model")
# What an export-hf directory holds (glob patterns): all that `--overwrite` may replace.
ENTRIES = ("config.json", WEIGHTS, MODELING_FILE) + TOKENIZER_FILES
_ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range", "classifier_dropout")


def class_names(model_type: str) -> dict[str, str]:
  """auto_map: the transformers Auto class -> the class of the modeling file for this backbone."""
  stem = {"bert": "RomeFlaxBert", "roberta": "RomeFlaxRoberta"}[model_type]
  module = MODELING_FILE[:-3]
  return {"AutoConfig": f"{module}.{stem}Config", "AutoModel": f"{module}.{stem}Model",
          "AutoModelForSequenceClassification": f"{module}.{stem}ForSequenceClassification",
          "AutoModelForTokenClassification": f"{module}.{stem}ForTokenClassification"}


def hf_config(cfg: ModelConfig, info: ExportInfo) -> dict:
  """config.json: what transformers' BertConfig / RobertaConfig reads, the labels, the exit settings, the metadata."""
  names = list(info.label_names) if len(info.label_names) == cfg.num_labels else [
      f"LABEL_{i}" for i in range(cfg.num_labels)]
  auto_map = class_names(cfg.model_type)
  head = heads.head_kind(cfg)
  out = {"architectures": [auto_map[head.hf_auto_class].split(".")[-1]], "model_type": cfg.model_type,
         "position_embedding_type": "absolute"}
  out.update({k: getattr(cfg, k) for k in _ARCH_KEYS})
  if cfg.model_type == "roberta":
    out.update(bos_token_id=0, eos_token_id=2)
  out.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
             problem_type=head.hf_problem_type(cfg),
             exit_head=cfg.head, exit_pooling=cfg.exit_pooling, regression_mean=cfg.regression_mean,
             regression_std=cfg.regression_std, auto_map=auto_map,
             **{HF_EXPORT_KEY: {"format": FORMAT, "metadata": info.to_dict()}})
  return out


def _save_safetensors(path: Path, tensors: dict) -> None:
  from safetensors.numpy import save
  files.atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def export_and_target(checkpoint, out_dir, *, overwrite: bool, kind: str, entries, hf_hint: str):
  """The checks of a command that turns a rome_flax export into a directory (export-hf, export): the
  checkpoint is an export, --out is not the export and may be written (files.check_output_target).
  Returns (export path, out path, the --out check, to repeat just before the directory is swapped in)."""
  src = Path(os.path.expanduser(str(checkpoint)))
  if not src.is_dir():
    raise RomeFlaxError(f"--checkpoint {checkpoint}: {'is a file' if src.exists() else 'does not exist'}; "
                        "pass a rome_flax export directory (what train.py or `python -m rome_flax convert` writes)")
  if not (src / EXPORT_CONFIG).is_file():
    raise RomeFlaxError(f"--checkpoint {checkpoint} is not a rome_flax export (no {EXPORT_CONFIG}); {hf_hint}")
  out = files.check_output_value(out_dir).absolute()
  if out == src.absolute():
    raise RomeFlaxError(f"--out {out_dir} is the export itself; choose another directory")

  def check_out():
    files.check_output_target(out, f"--out {out_dir}", overwrite, kind, entries,
                              occupied="already exists and is not empty")

  check_out()
  return src, out, check_out


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
              say=None) -> tuple[Path, MultiExitBert]:
  """Writes the Hugging Face directory of a rome_flax export (see the module's docstring). Refuses a
  checkpoint that is not a rome_flax export, and an existing non-empty out_dir unless `overwrite` (then
  replaces only an export-hf directory: files.check_replaceable)."""
  src, out, check_out = export_and_target(checkpoint, out_dir, overwrite=overwrite, kind=KIND, entries=ENTRIES,
                                          hf_hint="a Hugging Face checkpoint is already in Hugging Face format")
  model = MultiExitBert.from_pretrained(src, load_tokenizer_files=False)
  tensors = hf_state_dict(model.params, model.config)
  config = hf_config(model.config, model.export_info)
  tokenizer_files = sorted({p for g in TOKENIZER_FILES for p in src.glob(g) if p.is_file()})
  with RunLock(out):
    files.settle_output(out)
    check_out()   # again, now that no other command can write there
    with files.staged_output(out, KIND, commit_if=preemption.check_interrupted) as stage:
      _save_safetensors(stage / WEIGHTS, tensors)
      files.write_json(stage / "config.json", config)
      files.atomic_write_bytes(stage / MODELING_FILE, (Path(__file__).parent / MODELING_FILE).read_bytes())
      for p in tokenizer_files:
        try:
          shutil.copyfile(p, stage / p.name)
        except OSError as e:
          raise RomeFlaxError(f"cannot copy {p} into {out}: {e.strerror or e}") from None
  if say is not None:
    say(f"exported {src} -> {out} ({model.config.model_type}, {model.config.num_layers} exits, "
        f"{model.config.num_labels} labels, {model.config.head} head; {len(tensors)} tensors, "
        f"{len(tokenizer_files)} tokenizer files)")
  return out, model

