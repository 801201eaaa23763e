"""rome_flax's multi-exit BERT / RoBERTa in PyTorch transformers: the modeling file of an export-hf directory.

Written into the directory by `python -m rome_flax export-hf` and loaded by transformers with
`trust_remote_code=True`; it imports torch and transformers only (never jax or rome_flax):

    from transformers import AutoModelForSequenceClassification   # AutoModelForTokenClassification: token exits
    model = AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True).eval()
    out = model(**batch)          # out.logits: the final exit's; out.exit_logits: [exits, batch, labels]
    decided = model.early_exit(batch["input_ids"], batch["attention_mask"], threshold=0.1)

Each exit computes what rome_flax's heads compute (rome_flax/model/heads.py):
  sequence head: pool layer i's output (token 0 for exit_pooling 'cls', the masked mean for 'mean'), the
    pooler Linear + tanh, dropout, the classifier; a regression head (one label) outputs
    regression_std * z + regression_mean. The final exit's pooler is the backbone's own (`pooler.dense`).
  token head: dropout + the classifier on every piece ([batch, seq, labels]).
Weights: exits 1..L-1 are `{bert|roberta}.encoder.highway.{i}.pooler.dense` / `.classifier` (DeeBERT's names,
0-based i), the final exit's classifier is `classifier`.

`early_exit` takes rome_flax's entropy criterion (rome_flax/engine/exit_policy.py): a sentence exits at the first exit
whose softmax entropy H (nats) is below the threshold; token exits decide per sentence by the largest
normalised entropy H / log(labels) over its words (`word_mask`, default every real piece); the last exit always
exits. Layers stop running once every example in the batch has exited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from transformers import (BertConfig, BertModel, BertPreTrainedModel, RobertaConfig, RobertaModel,
                          RobertaPreTrainedModel)
from transformers.utils import ModelOutput


class RomeFlaxBertConfig(BertConfig):
  """BertConfig (model_type 'bert') with rome_flax's exit settings as attributes."""


class RomeFlaxRobertaConfig(RobertaConfig):
  """RobertaConfig (model_type 'roberta') with rome_flax's exit settings as attributes."""


@dataclass
class MultiExitOutput(ModelOutput):
  """logits: the final exit's; exit_logits: every exit's, [exits, batch, labels] (token exits
  [exits, batch, seq, labels]); loss: the final exit's, as transformers' *For*Classification models."""
  loss: Optional[torch.FloatTensor] = None
  logits: Optional[torch.FloatTensor] = None
  exit_logits: Optional[torch.FloatTensor] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


@dataclass
class EarlyExitOutput(ModelOutput):
  """exit_layer: the exit each example took, 1-based [batch]; logits: that exit's logits per example."""
  exit_layer: Optional[torch.LongTensor] = None
  logits: Optional[torch.FloatTensor] = None


class _Pooler(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class _Highway(nn.Module):
  """Exit i < L: `pooler.dense` (sequence head) and `classifier`."""

  def __init__(self, config, pooled: bool):
    super().__init__()
    if pooled:
      self.pooler = _Pooler(config)
    self.classifier = nn.Linear(config.hidden_size, config.num_labels)


class _Stop(Exception):
  """Raised by early_exit's layer hook once every example has exited: the remaining layers do not run."""


class _MultiExit:
  """Every exit of a rome_flax model on top of a BertModel / RobertaModel (`self.backbone`)."""

  exit_head = "sequence"

  def _build_exits(self, config):
    head = getattr(config, "exit_head", "sequence")
    if head != self.exit_head:
      other = "AutoModelForTokenClassification" if head == "token" else "AutoModelForSequenceClassification"
      raise ValueError(f"this rome_flax export has {head} exits: load it with {other}")
    pooling = getattr(config, "exit_pooling", "cls")
    if pooling not in ("cls", "mean"):
      raise ValueError(f"exit_pooling must be 'cls' or 'mean', got {pooling!r}")
    self.exit_pooling = pooling
    self.regression_mean = float(getattr(config, "regression_mean", 0.0))
    self.regression_std = float(getattr(config, "regression_std", 1.0))
    dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    self.dropout = nn.Dropout(dropout)
    self.backbone.encoder.highway = nn.ModuleList(
        _Highway(config, self.exit_head == "sequence") for _ in range(config.num_hidden_layers - 1))
    self.classifier = nn.Linear(config.hidden_size, config.num_labels)

  @property
  def backbone(self):
    return getattr(self, self.base_model_prefix)

  @property
  def num_exits(self) -> int:
    return self.config.num_hidden_layers

  @property
  def maps_regression_output(self) -> bool:
    return (self.exit_head == "sequence" and self.config.num_labels == 1
            and (self.regression_mean, self.regression_std) != (0.0, 1.0))

  def exit_logits_of(self, i: int, hidden_BxSxD, attention_mask_BxS):
    """Exit i (0-based; num_exits - 1 is the final one) on layer i's output."""
    final = i == self.num_exits - 1
    classifier = self.classifier if final else self.backbone.encoder.highway[i].classifier
    if self.exit_head == "token":
      return classifier(self.dropout(hidden_BxSxD))
    if self.exit_pooling == "cls":
      x_BxD = hidden_BxSxD[:, 0]
    else:
      m_BxSx1 = attention_mask_BxS[..., None].to(hidden_BxSxD.dtype)
      x_BxD = (hidden_BxSxD * m_BxSx1).sum(1) / m_BxSx1.sum(1).clamp(min=1)
    dense = self.backbone.pooler.dense if final else self.backbone.encoder.highway[i].pooler.dense
    logits_BxC = classifier(self.dropout(torch.tanh(dense(x_BxD))))
    if self.maps_regression_output:
      logits_BxC = logits_BxC * self.regression_std + self.regression_mean
    return logits_BxC

  def _mask(self, input_ids, inputs_embeds, attention_mask):
    if attention_mask is not None:
      return attention_mask
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    device = input_ids.device if input_ids is not None else inputs_embeds.device
    return torch.ones(shape, dtype=torch.long, device=device)

  def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
              labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    mask = self._mask(input_ids, inputs_embeds, attention_mask)
    out = self.backbone(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states   # embeddings, then every layer's output
    exit_logits = torch.stack([self.exit_logits_of(i, hidden[i + 1], mask) for i in range(self.num_exits)])
    logits = exit_logits[-1]
    loss = None if labels is None else self._loss(logits, labels)
    result = MultiExitOutput(loss=loss, logits=logits, exit_logits=exit_logits,
                             hidden_states=hidden if output_hidden_states else None,
                             attentions=getattr(out, "attentions", None))
    use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
    return result if use_dict else result.to_tuple()

  def _loss(self, logits, labels):
    C = self.config.num_labels
    if self.exit_head == "token":
      return nn.functional.cross_entropy(logits.view(-1, C), labels.view(-1), ignore_index=-100)
    problem = self.config.problem_type or (
        "regression" if C == 1 else
        "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if problem == "regression":
      return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype)) if C == 1 else \
          nn.functional.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
      return nn.functional.cross_entropy(logits.view(-1, C), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

  @staticmethod
  def entropy(logits):
    """H(softmax(z)) in nats, float32, as rome_flax's exit_policy.entropy: -sum softmax * log_softmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)

  def _confident(self, logits, word_mask_BxS, threshold: float):
    if self.exit_head == "token":   # SENTEE: the sentence's most uncertain word, normalised entropy
      u_BxS = self.entropy(logits) / math.log(logits.shape[-1])
      u_BxS = torch.where(word_mask_BxS > 0, u_BxS, torch.full_like(u_BxS, -math.inf))
      return u_BxS.max(-1).values < threshold
    return self.entropy(logits) < threshold

  def _thresholds(self, threshold) -> list:
    values = [float(threshold)] if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
    E = self.num_exits
    if len(values) not in (1, E - 1, E) or any(not math.isfinite(v) or v < 0 for v in values):
      raise ValueError(f"threshold: one entropy >= 0, or one per exit ({E - 1} or {E}), got {values}")
    return values * E if len(values) == 1 else values + values[-1:] * (E - len(values))

  @torch.no_grad()
  def early_exit(self, input_ids, attention_mask=None, threshold: Union[float, Sequence[float]] = 0.1,
                 token_type_ids=None, word_mask=None, min_exit_layer: int = 1) -> EarlyExitOutput:
    """Per-example early exit by rome_flax's entropy criterion (see the module docstring): each example
    takes the first exit (1-based layer >= min_exit_layer) whose entropy is below its threshold (one value,
    or one per exit), else the last. Returns EarlyExitOutput(exit_layer [batch] 1-based, logits per example:
    [batch, labels], or [batch, seq, labels] for token exits). Layers stop once every example has exited."""
    if self.exit_head == "sequence" and self.config.num_labels == 1:
      raise ValueError("a regression model has no class probabilities: early exit by entropy needs a classifier")
    taus = self._thresholds(threshold)
    mask = self._mask(input_ids, None, attention_mask)
    words = mask if word_mask is None else word_mask
    B, E = input_ids.shape[0], self.num_exits
    exit_layer = torch.full((B,), E, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    chosen = {}

    def hook(i, module, args, output):
      h = output[0] if isinstance(output, (tuple, list)) else output
      logits = self.exit_logits_of(i, h, mask).float()
      now = self._confident(logits, words, taus[i]) if i + 1 >= min_exit_layer else torch.zeros_like(done)
      now = now | (i == E - 1)
      newly = now & ~done
      exit_layer[newly] = i + 1
      chosen["logits"] = logits.clone() if "logits" not in chosen else torch.where(
          newly.view((B,) + (1,) * (logits.dim() - 1)), logits, chosen["logits"])
      done.logical_or_(now)
      if bool(done.all()):
        raise _Stop

    handles = [layer.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o))
               for i, layer in enumerate(self.backbone.encoder.layer)]
    try:
      self.backbone(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids, return_dict=True)
    except _Stop:
      pass
    finally:
      for handle in handles:
        handle.remove()
    return EarlyExitOutput(exit_layer=exit_layer, logits=chosen["logits"])


# ----------------------------------------------------------------------------- the classes auto_map names


class RomeFlaxBertModel(BertModel):
  """The backbone alone (BertModel): what `AutoModel` gives; the exits' weights stay unused."""
  config_class = RomeFlaxBertConfig


class RomeFlaxRobertaModel(RobertaModel):
  """The backbone alone (RobertaModel): what `AutoModel` gives; the exits' weights stay unused."""
  config_class = RomeFlaxRobertaConfig


class RomeFlaxBertForSequenceClassification(_MultiExit, BertPreTrainedModel):
  config_class = RomeFlaxBertConfig
  exit_head = "sequence"

  def __init__(self, config):
    super().__init__(config)
    self.bert = BertModel(config, add_pooling_layer=True)
    self._build_exits(config)
    self.post_init()


class RomeFlaxBertForTokenClassification(_MultiExit, BertPreTrainedModel):
  config_class = RomeFlaxBertConfig
  exit_head = "token"

  def __init__(self, config):
    super().__init__(config)
    self.bert = BertModel(config, add_pooling_layer=False)
    self._build_exits(config)
    self.post_init()


class RomeFlaxRobertaForSequenceClassification(_MultiExit, RobertaPreTrainedModel):
  config_class = RomeFlaxRobertaConfig
  exit_head = "sequence"

  def __init__(self, config):
    super().__init__(config)
    self.roberta = RobertaModel(config, add_pooling_layer=True)
    self._build_exits(config)
    self.post_init()


class RomeFlaxRobertaForTokenClassification(_MultiExit, RobertaPreTrainedModel):
  config_class = RomeFlaxRobertaConfig
  exit_head = "token"

  def __init__(self, config):
    super().__init__(config)
    self.roberta = RobertaModel(config, add_pooling_layer=False)
    self._build_exits(config)
    self.post_init()
