"""Model configuration: the architecture read from a Hugging Face config.json plus exit options."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

from rome_flax.errors import RomeFlaxError

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
EXIT_POOLINGS = ("cls", "mean")
DTYPES = ("float32", "bfloat16")
HEADS = ("sequence", "token")   # heads.HEAD_KINDS' names (checked here: config.py imports nothing of rome_flax's model)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture of a multi-exit encoder (hashable: it is a `jax.jit` static argument)."""

  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  initializer_range: float = 0.02
  # Multi-exit head options (not part of a Hugging Face config).
  num_labels: int = 2
  exit_pooling: str = "cls"
  dtype: str = "float32"
  head: str = "sequence"         # exit head kind (heads.HEAD_KINDS): 'sequence' or 'token'
  classifier_dropout: Optional[float] = None   # exit dropout; None: hidden_dropout_prob (as transformers)
  # Regression exits predict `regression_std * z + regression_mean` (the train labels' statistics), so each
  # exit's own output z is standardised while everything downstream sees the labels' units. (0, 1): the map
  # is the identity (classification, and exports written before the statistics existed).
  regression_mean: float = 0.0
  regression_std: float = 1.0

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise RomeFlaxError(
          f"unsupported model_type {self.model_type!r}: rome_flax supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.exit_pooling not in EXIT_POOLINGS:
      raise RomeFlaxError(f"exit_pooling must be one of {EXIT_POOLINGS}, got {self.exit_pooling!r}")
    if self.dtype not in DTYPES:
      raise RomeFlaxError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
      raise RomeFlaxError(f"unsupported hidden_act {self.hidden_act!r}")
    if self.hidden_size % self.num_attention_heads:
      raise RomeFlaxError("hidden_size must be a multiple of num_attention_heads")
    if self.head not in HEADS:
      raise RomeFlaxError(f"head must be one of {HEADS}, got {self.head!r}")
    if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
      raise RomeFlaxError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
    if self.num_labels < 1:
      raise RomeFlaxError(f"num_labels must be >= 1, got {self.num_labels}")
    if not (math.isfinite(self.regression_mean) and 0.0 < self.regression_std < float("inf")):
      raise RomeFlaxError(f"regression_mean must be finite and regression_std positive, got "
                          f"{self.regression_mean}, {self.regression_std}")

  @property
  def num_layers(self) -> int:
    return self.num_hidden_layers

  @property
  def num_exits(self) -> int:
    return self.num_hidden_layers

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def is_regression(self) -> bool:
    return self.num_labels == 1 and self.head == "sequence"

  @property
  def maps_regression_output(self) -> bool:
    """True when the regression exits rescale their output (a static choice: classification and
    unstandardised exports compile exactly the graph they always did)."""
    return self.is_regression and (self.regression_mean, self.regression_std) != (0.0, 1.0)

  @property
  def is_token_task(self) -> bool:
    """One logit vector per token (sequence labelling) rather than per sequence."""
    return self.head == "token"

  @property
  def exit_dropout(self) -> float:
    return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """Reads the fields rome_flax needs from a transformers config.json dict."""
    model_type = hf.get("model_type")
    if model_type is None:
      raise RomeFlaxError("config.json has no model_type: is this a Hugging Face BERT/RoBERTa checkpoint?")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise RomeFlaxError(
          f"config.json has model_type {model_type!r}; rome_flax supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise RomeFlaxError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in hf.items() if k in names}
    if "num_labels" not in overrides and "id2label" in hf:
      kwargs["num_labels"] = len(hf["id2label"])
    kwargs.update(overrides)
    if kwargs.get("pad_token_id") is None:
      kwargs["pad_token_id"] = 1 if model_type == "roberta" else 0
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise RomeFlaxError(f"unknown model config keys: {sorted(unknown)}")
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
