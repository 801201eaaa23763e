"""An embedded sentiment-with-negation task and its word-level tokenizer: offline, seconds to train.

Each sentence holds one sentiment word; a "not" right before it flips the label, while a stray "not"
elsewhere does not. The words alone get about 70% of the way; telling the two kinds of "not" apart
needs word order (a word's attention to the one before it).

The sentences are short (FILLER_WORDS filler words besides the sentiment phrase): with 5-19 fillers a
random 4-layer BERT sat at chance for 125-500 steps and where it escaped decided its accuracy
(final exit 68-96 over seeds, docs/results.md); with 2-7 every seed of configs/default.py learns the
word order within its 1,250 steps (5 seeds within 2 points at every exit).
"""

from __future__ import annotations

import numpy as np

from rome_flax.errors import RomeFlaxError

POSITIVE = ("good", "great", "fine", "lovely", "superb", "charming", "fun", "brilliant", "warm", "clever")
NEGATIVE = ("bad", "awful", "dull", "boring", "poor", "weak", "messy", "tedious", "bland", "clumsy")
FILLER = ("the", "a", "movie", "film", "plot", "cast", "story", "was", "is", "and", "very", "quite",
          "acting", "ending", "script", "of", "it", "this", "really", "score")
NEGATION = "not"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = SPECIAL + (NEGATION,) + POSITIVE + NEGATIVE + FILLER
FILLER_WORDS = (2, 7)   # fewest and most filler words of a sentence
SPLIT_SIZES = {"train": 4000, "dev": 1000, "test": 500}
_SPLIT_SEEDS = {"train": 0, "dev": 1, "test": 2}


def _sentence(rng: np.random.Generator, filler_words: tuple[int, int]) -> tuple[str, int]:
  words = [str(rng.choice(FILLER)) for _ in range(rng.integers(filler_words[0], filler_words[1] + 1))]
  positive = bool(rng.random() < 0.5)
  negated = bool(rng.random() < 0.4)
  at = int(rng.integers(1, len(words)))          # position of the sentiment word (never first)
  words.insert(at, str(rng.choice(POSITIVE if positive else NEGATIVE)))
  if negated:
    words.insert(at, NEGATION)
  elif rng.random() < 0.5:                        # a stray "not" elsewhere that negates nothing
    stray = int(rng.integers(0, len(words) - 1))
    stray = stray if stray < at - 1 else min(stray + 2, len(words))
    words.insert(stray, NEGATION)
    words.insert(stray + 1, str(rng.choice(FILLER)))
  return " ".join(words), int(positive != negated)


def make_split(split: str, seed: int = 0, size: int | None = None,
               filler_words: tuple[int, int] = FILLER_WORDS) -> tuple[list[str], np.ndarray]:
  """Texts and labels of one split (deterministic in split, seed and filler_words; (5, 19) gives the
  sentences of rome_flax before 2026-12-03)."""
  if not (len(filler_words) == 2 and 2 <= filler_words[0] <= filler_words[1]):
    raise RomeFlaxError(f"filler_words must be (fewest, most) with 2 <= fewest <= most, got {filler_words}")
  if split not in SPLIT_SIZES:
    raise RomeFlaxError(f"task synthetic has no split {split!r}; splits: {', '.join(SPLIT_SIZES)}")
  rng = np.random.default_rng([seed, _SPLIT_SEEDS[split]])
  rows = [_sentence(rng, filler_words) for _ in range(size or SPLIT_SIZES[split])]
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
