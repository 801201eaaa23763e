"""An embedded sentiment-with-negation task and its word-level tokenizer: offline, seconds to train.

Label = sign of the sentence's sentiment, where each sentiment word counts +1/-1 and a "not" right
before it flips it. Counting words is easy for the lowest exits; negation needs context, so deeper
exits do visibly better: the default run shows exits learning at different rates.
"""

from __future__ import annotations

import numpy as np

POSITIVE = ("good", "great", "fine", "lovely", "superb", "charming", "fun", "brilliant", "warm", "clever")
NEGATIVE = ("bad", "awful", "dull", "boring", "poor", "weak", "messy", "tedious", "bland", "clumsy")
FILLER = ("the", "a", "movie", "film", "plot", "cast", "story", "was", "is", "and", "very", "quite",
          "acting", "ending", "script", "of", "it", "this", "really", "score")
NEGATION = "not"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = SPECIAL + (NEGATION,) + POSITIVE + NEGATIVE + FILLER
SPLIT_SIZES = {"train": 4000, "dev": 1000, "test": 500}
_SPLIT_SEEDS = {"train": 0, "dev": 1, "test": 2}


def _sentence(rng: np.random.Generator) -> tuple[str, int]:
  while True:
    words, score = [], 0
    for _ in range(rng.integers(6, 25)):
      r = rng.random()
      if r < 0.25:
        negate = rng.random() < 0.35
        positive = rng.random() < 0.5
        if negate:
          words.append(NEGATION)
        words.append(str(rng.choice(POSITIVE if positive else NEGATIVE)))
        score += (1 if positive else -1) * (-1 if negate else 1)
      else:
        words.append(str(rng.choice(FILLER)))
    if score != 0:
      return " ".join(words), int(score > 0)


def make_split(split: str, seed: int = 0, size: int | None = None) -> tuple[list[str], np.ndarray]:
  """Texts and labels of one split (deterministic in split and seed)."""
  rng = np.random.default_rng([seed, _SPLIT_SEEDS.get(split, 3)])
  rows = [_sentence(rng) for _ in range(size or SPLIT_SIZES.get(split, 500))]
  return [t for t, _ in rows], np.asarray([y for _, y in rows], np.int64)


def build_tokenizer():
  """A BERT-style ([CLS] a [SEP] b [SEP]) word-level tokenizer over the synthetic vocabulary."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(VOCAB)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                 model_max_length=512)
