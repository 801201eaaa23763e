"""Runs a rome_flax artefact (what `python -m rome_flax export` writes) with jax and numpy alone.

This file is copied into every artefact as `artefact_runtime.py` and must not import rome_flax: a
server or another project loads the artefact without installing this package.

  import sys; sys.path.insert(0, "DIR")
  import artefact_runtime
  steps = artefact_runtime.load("DIR")
  state = steps.admit(steps.init(), slots, ids, mask, types, priority, thresholds)
  state = steps.run(state, "entropy", min_free=1, max_steps=1 << 30, busy=len(slots))
  running, exit_layer, logits = steps.read(state)

The artefact holds the early-exit engine's step functions (init / admit per batch and length bucket /
run per criterion and view of the slots / evict) and the full-model and all-exits forwards for fixed batch
and length buckets, each serialised by
`jax.export` with the parameters as arguments; the parameters once (`params.npz`); `manifest.json`
(shapes, buckets, labels, the export's identity, checksums); the tokenizer files. The engine state is a
dict of arrays (the engine's `EngineState` fields; the policy state as `policy_count_N`, `policy_prev_N`; a
token task's word mask as `words_NxS`). A token task's artefact admits rows with their word mask
(`admit(..., word_mask_BxS)`; `tokenize_words` makes it from word lists) and serves TOKEE on slots of its own
(`init(tokee=True)`: `tokee_*` fields, the functions `init_tokee`, `admit_tokee_*`, `evict_tokee`, `run_tokee*`;
the window fixed at export).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

FORMAT = "rome_flax-artefact/1"
MANIFEST = "manifest.json"
NEVER = 2 ** 30   # run(max_steps=NEVER) / run(min_free=NEVER): until no slot runs


class ArtefactError(ValueError):
  """A bad artefact or a call that does not fit it."""


def function_name(kind: str, batch: int, length: int) -> str:
  """The file stem of a bucketed forward ('full_model' or 'all_exits'), shared by export and load."""
  return f"{kind}_b{batch}_s{length}"


def run_name(criterion: str, view: int, rows: int, seq: int, batch: int) -> str:
  """The run of a criterion under a view of the slots' first `view` positions (no suffix: all `seq`), gathering
  `rows` rows (no suffix: all `batch`, the full tier); the one naming rule of export and load."""
  name = f"run_{criterion}" if view == seq else f"run_{criterion}_v{view}"
  return name if rows == batch else f"{name}_r{rows}"


def bucket(values: Sequence[int], n: int) -> Optional[int]:
  """The smallest of the (sorted) bucket values holding n, None if none does: THE rule by which a batch
  of rows is padded to a batch size and a length (serving.Engine, scheduler.view_for, this runtime)."""
  return next((v for v in values if v >= n), None)


def pick_tier(tiers: Sequence[tuple], busy: Optional[int]) -> tuple:
  """The (rows gathered, cut sizes) tier, of (rows, sizes) pairs fewest rows first, of a run with at most
  `busy` slots in use: the fewest rows that hold them (None or more than any: the last, full tier)."""
  rows = (busy is not None and bucket([r for r, _ in tiers], int(busy))) or tiers[-1][0]
  return rows, dict(tiers)[rows]


def right_padded_length(mask_BxS) -> int:
  """Positions a batch of rows uses: past its last unmasked position (1 for an all-padding batch)."""
  mask = np.asarray(mask_BxS) > 0
  if not mask.any():
    return 1
  return int(mask.shape[1] - np.argmax(mask[:, ::-1].any(0)))


def _padded(x, shape: tuple, fill, dtype) -> np.ndarray:
  """x in the leading corner of a `shape` array of `fill` (np.pad cost ~20 us a call: a third of a one-row admit)."""
  out = np.full(shape, fill, dtype)
  out[tuple(slice(0, n) for n in np.shape(x))] = x
  return out


def sha256_of(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _pick_device(platforms: Sequence[str]):
  """The first accelerator the artefact was exported for that this process has, else the CPU."""
  for p in platforms:
    if p == "cpu":
      continue
    try:
      return jax.devices(p)[0], p
    except RuntimeError:
      continue
  if "cpu" not in platforms:
    raise ArtefactError(f"this artefact was exported for {', '.join(platforms)}; this process has none of them")
  return jax.devices("cpu")[0], "cpu"


class ArtefactSteps:
  """The engine's steps and the bucketed forwards of one artefact, on one device.

  The parameters are put on the device once and passed to every function; each function compiles on
  its first call (`warmup` compiles them all). `init`, `admit`, `run` and `evict` donate the state they
  are given: use the state they return.
  """

  def __init__(self, path: Path, manifest: dict, params: tuple, exported: dict, device, platform: str):
    self.path, self.manifest, self.device, self.platform = path, manifest, device, platform
    model = manifest["model"]
    self.num_layers: int = model["num_layers"]
    self.num_exits: int = model["num_exits"]
    self.num_labels: int = model["num_labels"]
    self.is_token_task: bool = model["is_token_task"]
    self.is_regression: bool = model["is_regression"]
    self.pad_token_id: int = model["pad_token_id"]
    self.label_names: Optional[list] = manifest.get("label_names")
    self.slots: int = manifest["slots"]
    self.seq: int = manifest["seq"]
    self.batch: int = manifest["batch"]
    self.sizes: tuple = tuple(manifest["sizes"])
    self.lengths: tuple = tuple(manifest["lengths"])
    self.criteria: tuple = tuple(manifest["criteria"])
    self.window: Optional[int] = manifest.get("window")   # a token task's TOKEE window (static: one per artefact)
    # (rows gathered, cut sizes) by busy slots, fewest first; an artefact of before the tiers has one
    try:
      self.tiers: tuple = tuple((int(r), tuple(int(b) for b in c))
                                for r, c in manifest.get("tiers", [[self.batch, self.sizes]]))
    except (TypeError, ValueError):
      self.tiers = ()
    if not self.tiers or self.tiers[-1][0] != self.batch:
      raise ArtefactError(f"{path}: the manifest's tiers {manifest.get('tiers')!r} do not end at the batch {self.batch}")
    self._params = params
    self._exported = exported
    self._jitted: dict = {}
    self._tokenizer = None
    self._word_tokenizer = None

  # ------------------------------------------------------------------ calling the exported functions
  def _jit(self, name: str):
    fn = self._jitted.get(name)
    if fn is None:
      if name not in self._exported:
        raise ArtefactError(f"{self.path} has no exported function {name!r}")
      takes_state = name.startswith(("admit", "evict", "run_"))
      # the state (argument 1; 0 for evict) is donated: a step updates the slots in place, not a copy of them
      donate = ((0,) if name.startswith("evict") else (1,)) if takes_state else ()
      fn = self._jitted[name] = jax.jit(self._exported[name].call, donate_argnums=donate)
    return fn

  def _call(self, name: str, *args):
    if args:   # the parameters or the state live on the device: the NumPy arguments follow them there
      return self._jit(name)(*args)
    with jax.default_device(self.device):   # init takes no array: say where it runs
      return self._jit(name)()

  @staticmethod
  def _put(x, dtype) -> np.ndarray:
    """A host argument, left to the jitted call to transfer: a `jax.device_put` of each cost 0.15-0.25 ms, most
    of a one-row admission (TOKEE, CoNLL-2003 artefact: admit 2.1 -> 0.8 ms with `_padded`, AMD EPYC)."""
    return np.asarray(x, dtype)

  # ------------------------------------------------------------------ the engine
  def init(self, tokee: bool = False) -> dict:
    """Every slot free; `tokee`: TOKEE's slots (a token task's per-word halting state), which its run takes."""
    name = "init_tokee" if tokee else "init"
    if name not in self._exported:
      raise ArtefactError(f"{self.path} was exported without {'TOKEE' if tokee else 'a sentence criterion'}; "
                          f"its criteria: {', '.join(self.criteria)}")
    return self._call(name)

  @staticmethod
  def _layout(state: dict) -> str:
    """The suffix of the functions that take this state: TOKEE's slots, or a sentence criterion's."""
    return "_tokee" if "tokee_p_NxSxD" in state else ""

  def admit(self, state: dict, slot_B, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS, priority_B,
            threshold_BxE, word_mask_BxS=None) -> dict:
    """Rows into free slots (slot N: a padding row, dropped), right-padded. More than `batch` rows are
    admitted `batch` at a time, each part at the smallest exported (batch size, length) bucket that holds
    its rows and their longest mask (padding: pad_token_id, mask 0; the slots past it: zeros); an artefact
    of before those buckets pads every part to (batch, seq). A token task's rows come with their word mask
    (1 at each word's first piece)."""
    slot = np.asarray(slot_B, np.int32).reshape(-1)
    A = len(slot)
    ids = np.asarray(input_ids_BxS)
    if ids.ndim != 2 or ids.shape[0] != A or ids.shape[1] > self.seq:
      raise ArtefactError(f"admit: input_ids must be [{A}, <= {self.seq}], got {list(ids.shape)}")
    rows = [ids, np.asarray(attention_mask_BxS), np.asarray(token_type_ids_BxS)]
    if (word_mask_BxS is not None) != self.is_token_task:
      raise ArtefactError("admit: a token task's rows need their word mask (word_mask_BxS), and only a token task's "
                          "take one")
    if word_mask_BxS is not None:
      rows.append(np.asarray(word_mask_BxS))
    if any(r.shape != ids.shape for r in rows):
      raise ArtefactError(f"admit: input_ids, attention_mask, token_type_ids (and word_mask) differ in shape: "
                          f"{[list(r.shape) for r in rows]}")
    priority = np.broadcast_to(np.asarray(priority_B, np.int32), (A,))
    threshold = np.broadcast_to(np.asarray(threshold_BxE, np.float32), (A, self.num_exits))
    if slot.size and (slot.min() < 0 or slot.max() > self.slots):
      raise ArtefactError(f"admit: slots must be in 0..{self.slots - 1} (or {self.slots}: a padding row)")
    for start in range(0, max(A, 1), self.batch):
      part = slice(start, start + self.batch)
      n = len(slot[part])
      b, s = bucket(self.sizes, n), bucket(self.lengths, right_padded_length(rows[1][part]))
      name = function_name("admit" + self._layout(state), b, s)
      if name not in self._exported:
        name, b, s = "admit" + self._layout(state), self.batch, self.seq
      fit = lambda x, fill, dtype: _padded(np.asarray(x[part])[:, :s], (b, s), fill, dtype)
      state = self._call(
          name, self._params, state, _padded(slot[part], (b,), self.slots, np.int32),
          fit(rows[0], self.pad_token_id, np.int32), fit(rows[1], 0, np.int32), fit(rows[2], 0, np.int32),
          _padded(priority[part], (b,), 0, np.int32), _padded(threshold[part], (b, self.num_exits), 0, np.float32),
          *[fit(words, 0, np.int32) for words in rows[3:]])
    return state

  def run(self, state: dict, criterion: str, min_free: int = NEVER, max_steps: int = NEVER,
          delta: float = 0.0, longest: Optional[int] = None, busy: Optional[int] = None) -> dict:
    """Layer batches while a slot runs, fewer than `min_free` slots are free and fewer than `max_steps`
    ran; each slot exits by `criterion` with its own thresholds (`delta`: regression patience's tolerance).
    longest: no running example (and none admitted before the next call) has more pieces: the run then
    reads and writes only the first `view` positions of each slot, the shortest exported length that
    holds them (the serving engine's `longest`; None: the slots' whole length). busy: no more slots are
    in use: each step then gathers the fewest rows of the exported tiers that hold them (None: `batch`)."""
    if criterion not in self.criteria:
      raise ArtefactError(f"criterion {criterion!r} was not exported; this artefact has {', '.join(self.criteria)}")
    if (criterion == "tokee") != bool(self._layout(state)):
      raise ArtefactError(f"run {criterion}: TOKEE runs on the slots of init(tokee=True), a sentence criterion on "
                          "those of init()")
    if criterion == "patience" and self.is_regression and not (np.isfinite(delta) and delta > 0):
      raise ArtefactError(f"patience on a regression task needs a positive delta, got {delta}")
    view, rows = self.seq, self.tier(busy)[0]
    if longest is not None:
      view = bucket(self.lengths, int(longest))
      if view is None:
        raise ArtefactError(f"run: longest {longest} is past the slots' {self.seq} positions")
      if run_name(criterion, view, self.batch, self.seq, self.batch) not in self._exported:   # none before the views
        view = self.seq
    name = run_name(criterion, view, rows, self.seq, self.batch)
    return self._call(
        name, self._params, state, self._put(min(int(min_free), NEVER), np.int32),
        self._put(min(int(max_steps), NEVER), np.int32), self._put(delta, np.float32))

  def tier(self, busy: Optional[int] = None) -> tuple:
    """(rows gathered, cut sizes) of a run with at most `busy` slots in use (None: the full tier)."""
    return pick_tier(self.tiers, busy)

  def evict(self, state: dict, slot_mask_N) -> dict:
    """Frees slots (their caller went away): they stop running."""
    mask = np.asarray(slot_mask_N, bool)
    if mask.shape != (self.slots,):
      raise ArtefactError(f"evict: the slot mask must be [{self.slots}], got {list(mask.shape)}")
    return self._call("evict" + self._layout(state), state, self._put(mask, bool))

  def read(self, state: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(running_N, exit_N: 0-based exit taken, out_NxC: its logits) as NumPy copies; a token task's logits
    per piece [N, S, C], or with TOKEE each word's exit [N, W] and logits [N, W, C], words first."""
    exits = state["tokee_word_exit_NxW"] if self._layout(state) else state["exit_N"]
    return (np.array(state["running_N"], np.bool_), np.array(exits, np.int32), np.array(state["out_NxC"], np.float32))

  # ------------------------------------------------------------------ bucketed forwards
  def bucket_shape(self, batch: int, length: int) -> tuple[int, int]:
    """The smallest exported (batch, length) holding a batch of this shape (pad up to it)."""
    b, s = bucket(self.sizes, batch), bucket(self.lengths, length)
    if b is None or s is None:
      raise ArtefactError(f"no exported bucket holds [{batch}, {length}]: batches up to {self.sizes[-1]}, "
                          f"lengths up to {self.lengths[-1]}")
    return b, s

  def _forward(self, kind: str, ids, mask, types) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] not in self.sizes or ids.shape[1] not in self.lengths:
      raise ArtefactError(f"{kind}: shape {list(ids.shape)} is not exported; batch in {list(self.sizes)}, length "
                          f"in {list(self.lengths)} (pad to bucket_shape)")
    if np.shape(mask) != ids.shape or np.shape(types) != ids.shape:
      raise ArtefactError(f"{kind}: input_ids, attention_mask and token_type_ids differ in shape")
    b, s = ids.shape
    out = self._call(function_name(kind, b, s), self._params, self._put(ids, np.int32), self._put(mask, np.int32),
                                              self._put(types, np.int32))
    return np.array(out, np.float32)

  def full_model(self, input_ids_bxs, attention_mask_bxs, token_type_ids_bxs) -> np.ndarray:
    """Every layer, the final exit's logits [b, C]; (b, s) must be an exported bucket."""
    return self._forward("full_model", input_ids_bxs, attention_mask_bxs, token_type_ids_bxs)

  def all_exits(self, input_ids_bxs, attention_mask_bxs, token_type_ids_bxs) -> np.ndarray:
    """Every exit's logits [E, b, C]; (b, s) must be an exported bucket."""
    return self._forward("all_exits", input_ids_bxs, attention_mask_bxs, token_type_ids_bxs)

  def warmup(self) -> None:
    """Compiles every exported function now rather than on its first call."""
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    with jax.default_device(self.device):
      for name, exp in self._exported.items():
        args, kwargs = jax.tree.map(spec, exp.in_tree.unflatten(exp.in_avals))
        self._jit(name).lower(*args, **kwargs).compile()

  # ------------------------------------------------------------------ text
  def _text_tokenizer(self):
    """The export's tokenizer.json as a `tokenizers.Tokenizer`, loaded on first use, without padding."""
    if self._tokenizer is None:
      file = self.path / "tokenizer.json"
      if not file.is_file():
        raise ArtefactError(f"{self.path} has no tokenizer.json")
      try:
        from tokenizers import Tokenizer
      except ImportError:
        raise ArtefactError("tokenize needs the `tokenizers` package (pip install tokenizers)") from None
      self._tokenizer = Tokenizer.from_file(str(file))
      self._tokenizer.no_padding()
    return self._tokenizer

  def tokenize(self, texts, text_pairs=None, max_length: Optional[int] = None):
    """Token ids and token type ids (lists of lists, unpadded, cut to max_length: default `seq`) by the
    export's tokenizer.json; needs the `tokenizers` package."""
    tok = self._text_tokenizer()
    tok.enable_truncation(int(max_length or self.seq))
    texts = list(texts)
    pairs = list(zip(texts, text_pairs)) if text_pairs is not None else texts
    encs = tok.encode_batch(pairs)
    return [e.ids for e in encs], [e.type_ids for e in encs]

  def _unk_token(self, tok) -> Optional[str]:
    """The unknown token as transformers reads it: the config's, else the vocabulary model's."""
    return _configured_unk(self.path) or getattr(tok.model, "unk_token", None)

  def tokenize_words(self, sentences):
    """A token task's input: sentences given as word lists -> (input ids, token type ids, word masks), lists of
    lists, unpadded; the word mask is 1 at each word's first piece, what `admit` takes; needs `tokenizers`. The
    rule rome_flax trains and serves with (`kinds.data.encode_token_split`, which this file cannot import;
    tests/test_artefact.py checks that the two agree): each word tokenised on its own, a word with no piece read
    as the unknown token, a sentence never cut (one longer than `seq` pieces is an ArtefactError naming it)."""
    sentences = None if isinstance(sentences, str) else list(sentences)
    if sentences is None or any(isinstance(words, str) for words in sentences):
      raise ArtefactError("tokenize_words: give sentences as lists of words, not strings")
    sentences = [list(words) for words in sentences]
    for i, words in enumerate(sentences):
      if not words or any(not isinstance(w, str) or not w.strip() for w in words):
        raise ArtefactError(f"tokenize_words: sentence {i + 1} must be a non-empty list of non-empty words")
    if self._word_tokenizer is None:   # its own copy, never truncated: `tokenize` sets truncation per call
      from tokenizers import Tokenizer
      self._word_tokenizer = Tokenizer.from_str(self._text_tokenizer().to_str())
      self._word_tokenizer.no_truncation()
      self._word_tokenizer.no_padding()
    tok = self._word_tokenizer
    encs = tok.encode_batch(sentences, is_pretokenized=True)
    ids, types, word_masks = [], [], []
    for i, (words, enc) in enumerate(zip(sentences, encs)):
      first = _first_pieces(enc.word_ids, len(words))
      if first is None:   # a word with no piece (a stray control character): read as the unknown token
        unk = self._unk_token(tok)
        fixed = [w if unk is None or tok.encode(w, add_special_tokens=False).ids else unk for w in words]
        enc = tok.encode(fixed, is_pretokenized=True)
        first = _first_pieces(enc.word_ids, len(words))
        if first is None:
          raise ArtefactError(f"tokenize_words: sentence {i + 1} has a word with no piece in the vocabulary")
      if len(enc.ids) > self.seq:
        raise ArtefactError(f"tokenize_words: sentence {i + 1} is {len(enc.ids)} pieces; this artefact takes at "
                            f"most {self.seq} (sentences are never cut)")
      mask = [0] * len(enc.ids)
      for pos in first:
        mask[pos] = 1
      ids.append(list(enc.ids))
      types.append(list(enc.type_ids))
      word_masks.append(mask)
    return ids, types, word_masks


def _configured_unk(path: Path) -> Optional[str]:
  """The unknown token the tokenizer's config files name (a string or {"content": ...}), None if none does."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    try:
      unk = json.loads((path / name).read_text(encoding="utf-8")).get("unk_token")
    except (OSError, ValueError, AttributeError):
      continue
    unk = unk.get("content") if isinstance(unk, dict) else unk
    if isinstance(unk, str) and unk:
      return unk
  return None


def _first_pieces(word_ids, num_words: int) -> Optional[list]:
  """Position of each word's first piece from the tokenizer's word alignment; None when a word has none."""
  first = [-1] * num_words
  for pos, w in enumerate(word_ids):
    if w is not None and first[w] < 0:
      first[w] = pos
  return None if min(first) < 0 else first


def load(path, *, verify: bool = True) -> ArtefactSteps:
  """Reads an artefact directory; `verify` checks every file against the manifest's SHA-256 first."""
  path = Path(path).expanduser().absolute()
  try:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ArtefactError(f"{path} is not a rome_flax artefact (no {MANIFEST})") from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ArtefactError(f"{path / MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ArtefactError(f"{path} is in format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
                        f"this runtime reads {FORMAT!r}")
  for rel, entry in manifest["files"].items():
    file = path / rel
    if not file.is_file() or file.stat().st_size != entry["bytes"] or (verify and sha256_of(file) != entry["sha256"]):
      raise ArtefactError(f"{path} is damaged: {rel} is missing or differs from its checksum; export it again")
  device, platform = _pick_device(manifest["platforms"])
  spec = manifest["params"]
  with np.load(path / spec["file"], allow_pickle=False) as npz:
    leaves = []
    for leaf in spec["leaves"]:
      arr = npz[leaf["key"]]
      if str(arr.dtype) != leaf["dtype"]:   # stored as raw bits (bfloat16: uint16)
        arr = arr.view(jnp.dtype(leaf["dtype"]))
      leaves.append(jax.device_put(arr, device))
  exported = {name: jax_export.deserialize(bytearray((path / fn["file"]).read_bytes()))
              for name, fn in manifest["functions"].items()}
  return ArtefactSteps(path, manifest, tuple(leaves), exported, device, platform)
