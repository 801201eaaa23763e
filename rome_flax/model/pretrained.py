"""`MultiExitBert`: the Hugging Face-style front door (from_pretrained / __call__ / save_pretrained).

Two on-disk formats are read: a Hugging Face checkpoint (converted on load, see convert.py) and a
rome_flax export (`rome_flax_config.json` + Orbax `params/` + tokenizer files) written by
`save_pretrained`, which is what train.py exports and infer.py reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.io import files, integrity, preemption
from rome_flax.io.files import staged_directory
from rome_flax.io.runlock import RunLock
from rome_flax.model import encoder as model_lib
from rome_flax.model import layers
from rome_flax.model.config import ModelConfig
from rome_flax.model.convert import HF_EXPORT_KEY, LoadReport, load_hf_checkpoint, read_hf_config, resolve_checkpoint_dir

log = logging.getLogger(__name__)

EXPORT_CONFIG = "rome_flax_config.json"
EXPORT_PARAMS = "params"
# What an export holds (glob patterns): all that `convert --overwrite` may replace.
EXPORT_ENTRIES = (EXPORT_CONFIG, EXPORT_PARAMS, integrity.MANIFEST, "tokenizer*", "special_tokens_map.json", "vocab.*",
                  "merges.txt", "added_tokens.json", "*.model")
# rome_flax/2: weight matrices [out, in] (model.Linear). rome_flax/1 stored them [in, out]; still read.
EXPORT_FORMAT = "rome_flax/2"
_LEGACY_IN_OUT_FORMAT = "rome_flax/1"


@functools.partial(jax.jit, static_argnames=("cfg", "deterministic", "output_hidden_states"))
def _jit_forward(params, cfg, input_ids, attention_mask, token_type_ids, rng, deterministic,
                 output_hidden_states):
  return model_lib.forward(params, cfg, input_ids, attention_mask, token_type_ids,
                           deterministic=deterministic, rng=rng, output_hidden_states=output_hidden_states)


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  """What an export says about how it was made: written by train.py / convert, read by infer.py.

  Stored under "metadata" in rome_flax_config.json with these names. Every field is optional and
  unknown keys are ignored, so exports from older (or newer) rome_flax versions still load.
  """
  task: Optional[str] = None
  label_names: tuple = ()
  is_regression: Optional[bool] = None
  method: Optional[str] = None
  gr: Optional[str] = None            # the GR mode that was in effect ('none' when the method has none)
  max_length: Optional[int] = None    # the training max length (infer.py's default)
  dev_metrics: Optional[dict] = None  # split -> per-exit metric dicts at the end of training
  primary_metric: Optional[str] = None
  source: Optional[str] = None        # the checkpoint this was converted from

  def __post_init__(self):
    object.__setattr__(self, "label_names", tuple(self.label_names or ()))

  def to_dict(self) -> dict:
    """The fields that are set (JSON types), as rome_flax_config.json stores them."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is None or (f.name == "label_names" and not value):
        continue
      out[f.name] = list(value) if f.name == "label_names" else value
    return out

  @classmethod
  def from_dict(cls, d: Optional[dict]) -> "ExportInfo":
    if not isinstance(d, dict):
      return cls()
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def replace(self, **kw) -> "ExportInfo":
    return dataclasses.replace(self, **kw)


def load_tokenizer(path: Path):
  """transformers' AutoTokenizer from a directory, or None (with a warning) when it has none."""
  try:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
  except Exception as e:  # a weights-only directory is legitimate (e.g. tests); say so, go on
    log.warning("no tokenizer loaded from %s (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None


class MultiExitBert:
  """A multi-exit BERT or RoBERTa: configuration, parameters and tokenizer.

  >>> model = MultiExitBert.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=2)
  >>> out = model(ids, attention_mask=mask, output_hidden_states=True)
  >>> out.exit_logits.shape    # [exits, batch, labels]
  """

  def __init__(self, config: ModelConfig, params: dict, tokenizer: Any = None,
               load_report: Optional[LoadReport] = None, export_info: Optional[ExportInfo] = None):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.load_report = load_report
    self.export_info = export_info or ExportInfo()

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_config(cls, config: ModelConfig, seed: int = 0, tokenizer: Any = None) -> "MultiExitBert":
    return cls(config, model_lib.init_params(config, jax.random.PRNGKey(seed)), tokenizer)

  @classmethod
  def from_pretrained(cls, path_or_id: str | os.PathLike, num_labels: Optional[int] = None,
                      exit_pooling: Optional[str] = None, dtype: Optional[str] = None, seed: int = 0,
                      revision: Optional[str] = None, load_tokenizer_files: bool = True, head: Optional[str] = None,
                      label_names=None, classifier_dropout: Optional[float] = None) -> "MultiExitBert":
    """Loads a rome_flax export or a Hugging Face checkpoint (local directory or hub id).

    For Hugging Face checkpoints `num_labels` defaults to the checkpoint's own label count (2 if it
    has none); `exit_pooling` defaults to the checkpoint's (an export-hf directory's) or 'cls', and
    `dtype` to 'float32'. For a rome_flax export they default to the saved values. head='token' builds
    token exits (sequence labelling) over `label_names`, taking a token classifier's head as exit L when
    its labels are the same (default: the export's head; for a Hugging Face checkpoint an export-hf
    directory's own, else 'sequence').
    """
    ckpt_dir = resolve_checkpoint_dir(str(path_or_id), revision)
    if (ckpt_dir / EXPORT_CONFIG).is_file():
      return cls._from_export(ckpt_dir, num_labels, exit_pooling, dtype, load_tokenizer_files, head)
    cfg, params, report, ckpt_dir = load_hf_checkpoint(
        str(ckpt_dir), num_labels=num_labels, exit_pooling=exit_pooling, dtype=dtype or "float32",
        seed=seed, head=head, label_names=label_names, classifier_dropout=classifier_dropout)
    # Missing encoder weights usually mean the wrong checkpoint: say so loudly.
    level = logging.WARNING if any(not m.startswith(("pooler", "classifier")) for m in report.missing) else logging.INFO
    log.log(level, "loaded %s: %s", ckpt_dir, report.summary())
    tokenizer = load_tokenizer(ckpt_dir) if load_tokenizer_files else None
    exported = read_hf_config(ckpt_dir).get(HF_EXPORT_KEY)   # an export-hf directory keeps the export's metadata
    info = ExportInfo.from_dict(exported.get("metadata") if isinstance(exported, dict) else None)
    return cls(cfg, jax.tree.map(jnp.asarray, params), tokenizer, report,
               export_info=info.replace(source=str(path_or_id)))

  @classmethod
  def _from_export(cls, ckpt_dir: Path, num_labels, exit_pooling, dtype, load_tokenizer_files, head=None):
    check_export(ckpt_dir)
    try:
      saved = json.loads((ckpt_dir / EXPORT_CONFIG).read_text(encoding="utf-8"))
      cfg = ModelConfig.from_dict(saved["model"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise RomeFlaxError(f"{ckpt_dir / EXPORT_CONFIG} is malformed ({type(e).__name__}: {e}); was it written by "
                          "rome_flax?") from None
    if head is not None and head != cfg.head:
      what = {"token": "token exits (sequence labelling)", "sequence": "one prediction per sentence"}
      raise RomeFlaxError(f"{ckpt_dir} has {what.get(cfg.head, cfg.head)}; this task needs {what.get(head, head)}")
    if num_labels is not None and num_labels != cfg.num_labels:
      raise RomeFlaxError(f"{ckpt_dir} was trained with {cfg.num_labels} labels, not {num_labels}")
    fmt = saved.get("format", _LEGACY_IN_OUT_FORMAT)
    if fmt not in (EXPORT_FORMAT, _LEGACY_IN_OUT_FORMAT):
      raise RomeFlaxError(f"{ckpt_dir} is in format {fmt!r}; this rome_flax reads {EXPORT_FORMAT!r} and "
                          f"{_LEGACY_IN_OUT_FORMAT!r}")
    cfg = cfg.replace(exit_pooling=exit_pooling or cfg.exit_pooling, dtype=dtype or cfg.dtype)
    params = restore_params(ckpt_dir / EXPORT_PARAMS, cfg, kernels_in_out=fmt == _LEGACY_IN_OUT_FORMAT)
    # On the device once, as a Hugging Face checkpoint's: Orbax hands back host (NumPy) arrays, and a jitted
    # call given host arrays copies every one in again on each call. MiniLM at batch 1 (AMD EPYC): the full
    # model 19.7 -> 12.3 ms a call, the batch-1 early-exit loop 21.2 -> 13.5 ms; the README's 4-layer model
    # 1.04 -> 0.58 ms and 1.28 -> 0.75 ms.
    params = jax.tree.map(jnp.asarray, params)
    tokenizer = load_tokenizer(ckpt_dir) if load_tokenizer_files else None
    return cls(cfg, params, tokenizer, export_info=ExportInfo.from_dict(saved.get("metadata")))

  # ------------------------------------------------------------------ use
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, output_hidden_states: bool = False,
               deterministic: bool = True, rng=None) -> model_lib.MultiExitOutput:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
      raise RomeFlaxError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    if not deterministic and rng is None:
      raise RomeFlaxError("dropout (deterministic=False) needs an rng")
    return _jit_forward(self.params, self.config, input_ids, attention_mask, token_type_ids, rng,
                        deterministic, output_hidden_states)

  def encode(self, texts, text_pairs=None, max_length: int = 128):
    """Tokenises to NumPy arrays (input_ids, attention_mask, token_type_ids)."""
    if self.tokenizer is None:
      raise RomeFlaxError("this model has no tokenizer; pass token ids instead")
    enc = self.tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, padding=True,
                         truncation=True, max_length=max_length, return_tensors="np",
                         return_token_type_ids=True)
    return {k: np.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}

  # ------------------------------------------------------------------ saving
  def save_pretrained(self, out_dir: str | os.PathLike, export_info: Optional[ExportInfo] = None) -> Path:
    """Writes an export directory atomically (files.staged_directory); `export_info` replaces
    the model's own `export_info` in the written file."""
    info = self.export_info if export_info is None else export_info
    with staged_directory(out_dir) as stage:
      save_params(stage / EXPORT_PARAMS, self.params)
      (stage / EXPORT_CONFIG).write_text(json.dumps(
          {"format": EXPORT_FORMAT, "model": self.config.to_dict(), "metadata": info.to_dict()},
          indent=2, sort_keys=True))
      if self.tokenizer is not None:
        self.tokenizer.save_pretrained(str(stage))
      integrity.write_manifest(stage)   # last: it seals every file above
    return Path(out_dir).absolute()


def check_export(path: Path) -> None:
  """Refuses an export whose files differ from its checksums; warns about one written without them."""
  verdict = integrity.verify(path)
  if verdict.status == integrity.DAMAGED:
    raise RomeFlaxError(f"export {path} is damaged: {verdict.problem} (export it again; if you changed it on "
                        f"purpose, delete its {integrity.MANIFEST})")
  if verdict.status == integrity.UNVERIFIED:
    log.warning("export %s has no %s (an older rome_flax wrote it): its files are not verified", path,
                integrity.MANIFEST)


MultiExitRoberta = MultiExitBert
"""RoBERTa checkpoints load through the same class (model_type is read from config.json)."""


def convert_checkpoint(src: str, out_dir: str | os.PathLike, *, num_labels: Optional[int] = None,
                       exit_pooling: Optional[str] = None, dtype: str = "float32", seed: int = 0,
                       overwrite: bool = False) -> tuple[Path, MultiExitBert]:
  """A Hugging Face checkpoint (directory or hub id) -> a rome_flax export; converting once makes
  later loads skip the name mapping (a rome_flax export is copied with its metadata). Refuses an
  existing out_dir unless `overwrite`, and then replaces only an export (files.check_replaceable);
  out_dir is locked (runlock.py) and the export swapped in whole."""
  out = files.check_output_value(out_dir).absolute()

  def check_out():
    files.check_output_target(out, str(out_dir), overwrite, "export", EXPORT_ENTRIES, legacy=EXPORT_CONFIG)

  check_out()
  model = MultiExitBert.from_pretrained(src, num_labels=num_labels, exit_pooling=exit_pooling, dtype=dtype,
                                        seed=seed)
  info = model.export_info   # a Hugging Face checkpoint's: source=src (and an export-hf directory's metadata)
  with RunLock(out):
    files.settle_output(out)
    check_out()   # again, now that no other command can write there
    with files.staged_output(out, "export", commit_if=preemption.check_interrupted) as stage:
      model.save_pretrained(stage, info)
  return out, model


def _local_checkpointer():
  """An Orbax checkpointer run by the calling process alone: export parameters are host arrays that
  one process writes (process 0 of a multi-host job) and any process reads, with no collective."""
  import orbax.checkpoint as ocp
  me = jax.process_index()
  return ocp.StandardCheckpointer(
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save_params(path: Path, params) -> None:
  with _local_checkpointer() as ckptr:
    ckptr.save(Path(path).absolute(), jax.device_get(params))


def restore_params(path: Path, cfg: ModelConfig, kernels_in_out: bool = False):
  """kernels_in_out: the export stores weight matrices [in, out] (format rome_flax/1)."""
  path = Path(path).absolute()
  if not path.is_dir():
    raise RomeFlaxError(f"{path} is missing: not a complete rome_flax export")
  shapes = model_lib.param_shapes(cfg)
  if kernels_in_out:
    shapes = jax.eval_shape(layers.swap_kernel_axes, shapes)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
  try:
    with _local_checkpointer() as ckptr:
      mismatch = integrity.first_mismatch(ckptr.metadata(path), target)
      if mismatch:
        raise RomeFlaxError(f"the arrays of {path.parent} do not match its {EXPORT_CONFIG}: {mismatch}")
      params = ckptr.restore(path, target)
  except RomeFlaxError:
    raise
  except Exception as e:
    msg = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    raise RomeFlaxError(f"cannot restore parameters from {path}: {msg}") from None
  return layers.swap_kernel_axes(params) if kernels_in_out else params

