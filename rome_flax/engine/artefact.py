"""A rome_flax export -> an artefact that serves without rome_flax (`python -m rome_flax export`).

The artefact is the open engine (scheduler.py) and the plain forwards compiled-ready for fixed shapes:
each function is `jax.export`ed (StableHLO, serialised) with the parameters as its first argument, so
the weights are stored once and any process with jax loads it through `artefact_runtime.py` (copied in):

  functions/init.jax                      () -> state                     engine.init(cfg, N, S)
  functions/admit_b{b}_s{s}.jax           (params, state, slot_b, ids_bxs, mask_bxs, types_bxs,
                                           priority_b, threshold_bxE[, words_bxs]) -> state   engine.admit,
                                          every b in `sizes`, s in `lengths` (rows at their own bucket);
                                          a token task's rows come with their word mask (each word's
                                          first piece)
  functions/init_tokee, admit_tokee_b{b}_s{s}, evict_tokee   the same for TOKEE's slots (a token task's
                                          per-word halting state, engine.init(..., tokee=True)), which
                                          run_tokee* take
  functions/run_{criterion}.jax           (params, state, min_free, max_steps, delta) -> state
                                          engine.run(batch_size=B, the full tier's cut sizes,
                                          pick='oldest'), thresholds per slot (serving.LocalSteps' run);
                                          run_{criterion}_v{v}: the same under a view of the slots' first
                                          v positions, each v < S in `lengths` (the runtime picks it from
                                          `run(longest=...)`); ..._r{rows}: gathering `rows` < B rows with
                                          that tier's cuts, for when no more slots are busy
                                          (`serving.run_tiers`; `run(busy=...)`; `runtime.run_name`)
  functions/evict.jax                     (state, slot_mask_N) -> state               engine.evict
  functions/{full_model,all_exits}_b{b}_s{s}.jax   (params, ids, mask, types) -> logits, every b in
                                          `sizes`, s in `lengths` (early_exit.full_model / all_exits)
  params.npz                              the per-layer parameters (`early_exit.prepare_params`), flat
  manifest.json                           shapes, buckets, labels, the export's identity, checksums
  artefact_runtime.py, tokenizer files

The state is a dict of arrays (the `EngineState` fields), which `jax.export` serialises without a
registered type. Exported functions are the jitted functions the in-process path calls, lowered for the
same shapes, so on one machine they give the same bits (tests/test_artefact.py). A token task's artefact
serves TOKEE with the window given at export (manifest "window") and its sentence criteria (SENTEE).
The directory follows the output rules of files.py (kind "artefact", locked, staged, swapped in).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax.engine import artefact_runtime as runtime
from rome_flax.engine import exit_policy as ep
from rome_flax.engine import scheduler as engine
from rome_flax.engine import token_policy as tp
from rome_flax.engine.serving import default_sizes, run_tiers
from rome_flax.errors import RomeFlaxError
from rome_flax.io import files, preemption
from rome_flax.io.runlock import RunLock
from rome_flax.kinds.kind import kind_of
from rome_flax.model.config import ModelConfig
from rome_flax.model.export_hf import TOKENIZER_FILES, export_and_target
from rome_flax.model.pretrained import MultiExitBert

log = logging.getLogger(__name__)

KIND = "artefact"
PARAMS = "params.npz"
FUNCTIONS = "functions"
RUNTIME = "artefact_runtime.py"
# What an artefact directory holds (glob patterns): all that `--overwrite` may replace (__pycache__: the
# runtime imported from the directory).
ENTRIES = (runtime.MANIFEST, PARAMS, FUNCTIONS, RUNTIME, "__pycache__") + TOKENIZER_FILES
PLATFORMS = ("cpu", "cuda")   # lowered for both when this jax can (no GPU needed), else for cpu alone
PICK = "oldest"               # the run's layer rule (engine.pick_layer): the server's, as serving.LocalSteps


def default_criteria(cfg: ModelConfig) -> tuple[str, ...]:
  """Every criterion the engine serves for this task: a token task's TOKEE first, then its sentence criteria
  (SENTEE), or a sentence task's."""
  kind = kind_of(cfg)
  return (("tokee",) if kind.token_level_exit else ()) + tuple(kind.criteria)


# ----------------------------------------------------------------------------- the state as a dict


def state_dict(state: engine.EngineState) -> dict:
  """EngineState -> a flat dict of arrays (what the exported functions take and return): the policy state as
  `policy_*`, a token task's word mask as `words_NxS`, TOKEE's per-word state as `tokee_*`."""
  out = {k: v for k, v in state._asdict().items() if k not in ("policy_state", "words_NxS", "tokee")}
  out.update(policy_count_N=state.policy_state.count_B, policy_prev_N=state.policy_state.prev_B)
  if state.words_NxS is not None:
    out["words_NxS"] = state.words_NxS
  if state.tokee is not None:
    out.update({f"tokee_{k}": v for k, v in state.tokee._asdict().items()})
  return out


def engine_state(d: dict) -> engine.EngineState:
  rest = {k: v for k, v in d.items() if not k.startswith(("policy_", "tokee_"))}
  tokee = ({k: d[f"tokee_{k}"] for k in engine.TokenSlots._fields} if "tokee_p_NxSxD" in d else None)
  return engine.EngineState(**rest, policy_state=ep.PolicyState(d["policy_count_N"], d["policy_prev_N"]),
                            tokee=None if tokee is None else engine.TokenSlots(**tokee))


# ----------------------------------------------------------------------------- the functions


def _policy(cfg: ModelConfig, criterion: str, delta, window: Optional[int]):
  """The run's policy: thresholds come from the slots (engine.step replaces them), delta is an argument;
  TOKEE's window is the artefact's (static: it shapes the step)."""
  if criterion == "tokee":
    return tp.make_token_policy(1.0, window, cfg.num_layers)
  patience_delta = 1.0 if criterion == "patience" and cfg.is_regression else None
  policy = ep.policy_for(cfg, criterion, 1.0, delta=patience_delta)
  return policy.replace(delta=jnp.asarray(delta, jnp.float32))


def exported_functions(prepared: dict, cfg: ModelConfig, *, slots: int, batch: int, sizes: Sequence[int],
                       lengths: Sequence[int], criteria: Sequence[str], platforms: Sequence[str],
                       window: Optional[int] = None) -> dict[str, jax.export.Exported]:
  """Every function of the artefact, `jax.export`ed (see the module's docstring)."""
  leaves, treedef = jax.tree.flatten(prepared)
  P = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
  unflat = lambda p: jax.tree.unflatten(treedef, p)
  S, E, i32 = lengths[-1], cfg.num_exits, jnp.int32
  sds = jax.ShapeDtypeStruct
  scalar = lambda dtype: sds((), dtype)
  export = lambda fn, *args: jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  takes_words = kind_of(cfg).token_level_exit   # a token task's admit takes the word mask (each word's first piece)
  out = {}
  # Two state layouts where TOKEE is exported: a sentence criterion's slots, and TOKEE's (per-word halting).
  for tokee in sorted({c == "tokee" for c in criteria}):
    suffix = "_tokee" if tokee else ""
    fresh = lambda tokee=tokee: state_dict(engine.init(cfg, slots, S, tokee))
    state = jax.eval_shape(fresh)
    out["init" + suffix] = export(fresh)

    def admit(p, st, slot_B, ids, mask, types, priority_B, threshold_BxE, *word_mask):
      return state_dict(engine.admit(unflat(p), cfg, engine_state(st), slot_B, ids, mask, types, priority_B,
                                     threshold_BxE, *word_mask))

    for b in sizes:   # admission at the rows' own bucket (engine.admit: zeros past them)
      for s in lengths:
        rows = sds((b, s), i32)
        out[runtime.function_name("admit" + suffix, b, s)] = export(
            admit, P, state, sds((b,), i32), rows, rows, rows, sds((b,), i32), sds((b, E), jnp.float32),
            *((rows,) if takes_words else ()))
    out["evict" + suffix] = export(lambda st, m: state_dict(engine.evict(engine_state(st), m)), state,
                                   sds((slots,), bool))
    for criterion in (c for c in criteria if (c == "tokee") == tokee):
      for view in lengths:   # the whole slots (S), and each shorter view of them (engine.run's `view`)
        for rows, cuts in run_tiers(tuple(sizes), batch):   # rows gathered by how many slots are busy
          def run(p, st, min_free, max_steps, delta, criterion=criterion, view=None if view == S else view,
                  rows=rows, cuts=cuts):
            return state_dict(engine.run(unflat(p), cfg, _policy(cfg, criterion, delta, window), engine_state(st),
                                         rows, lengths=tuple(lengths), min_free=min_free, max_steps=max_steps,
                                         sizes=cuts, pick=PICK, view=view))
          out[runtime.run_name(criterion, view, rows, S, batch)] = export(
              run, P, state, scalar(i32), scalar(i32), scalar(jnp.float32))
  from rome_flax.engine import early_exit
  for kind, fn in (("full_model", early_exit.full_model), ("all_exits", early_exit.all_exits)):
    for b in sizes:
      for s in lengths:
        x = sds((b, s), i32)
        out[runtime.function_name(kind, b, s)] = export(
            lambda p, ids, mask, types, fn=fn: fn(unflat(p), cfg, ids, mask, types), P, x, x, x)
  return out


# ----------------------------------------------------------------------------- the command


def _params_npz(leaves) -> tuple[bytes, list[dict]]:
  """The flat parameters as .npz bytes; a dtype NumPy cannot store (bfloat16) goes as its raw bits."""
  arrays, listed = {}, []
  for k, (path, x) in enumerate(leaves):
    x = np.asarray(x)
    key = f"p{k:04d}"
    stored = x if x.dtype.kind in "biuf" and x.dtype.isbuiltin else x.view(f"u{x.dtype.itemsize}")
    arrays[key] = stored
    listed.append({"key": key, "path": jax.tree_util.keystr(path), "shape": list(x.shape), "dtype": str(x.dtype)})
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue(), listed


def parse_ints(text: str, what: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in str(text).split(",") if v.strip())
  except ValueError:
    raise RomeFlaxError(f"{what} takes a comma list of integers, got {text!r}") from None
  if not values:
    raise RomeFlaxError(f"{what} is empty")
  return values


def check_shapes(cfg: ModelConfig, slots: int, batch: int, sizes: Sequence[int], max_length: int) -> None:
  if slots < 1 or not 1 <= batch <= slots:
    raise RomeFlaxError(f"--slots {slots} --batch {batch}: need 1 <= batch <= slots")
  if any(not 1 <= b <= batch for b in sizes):
    raise RomeFlaxError(f"--sizes {','.join(map(str, sizes))}: every size must be in 1..{batch} (--batch)")
  longest = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0)
  if not 1 <= max_length <= longest:
    raise RomeFlaxError(f"--max_length {max_length}: this model takes 1..{longest} pieces")


def check_criteria(cfg: ModelConfig, criteria: Sequence[str]) -> None:
  for c in criteria:
    if c == "tokee":
      if not kind_of(cfg).token_level_exit:
        raise RomeFlaxError("--criteria tokee: token-level early exit is for token tasks; this export labels sentences")
      continue
    try:
      ep.policy_for(cfg, c, 1.0, delta=1.0 if c == "patience" and cfg.is_regression else None)
    except RomeFlaxError as e:
      raise RomeFlaxError(f"--criteria {c}: {e}") from None
  if len(set(criteria)) != len(criteria):
    raise RomeFlaxError(f"--criteria names a criterion twice: {','.join(criteria)}")


def _takes_params(name: str) -> bool:
  """Whether an exported function takes the parameters (first): all but init and evict."""
  return not name.startswith(("init", "evict"))


def export_artefact(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, slots: int = 256,
                    batch: int = 64, sizes: Optional[Sequence[int]] = None, max_length: Optional[int] = None,
                    criteria: Optional[Sequence[str]] = None, window: Optional[int] = None, overwrite: bool = False,
                    say=None) -> Path:
  """Writes the artefact of a rome_flax export (see the module's docstring). window: a token task's TOKEE
  window (default 3; the artefact's, as a server's). Refuses a checkpoint that is not a rome_flax export,
  and an existing non-empty out_dir unless `overwrite` (then replaces only an artefact directory:
  files.check_replaceable)."""
  from rome_flax.engine import calibration, evaluation
  src, out, check_out = export_and_target(
      checkpoint, out_dir, overwrite=overwrite, kind=KIND, entries=ENTRIES,
      hf_hint="convert a Hugging Face checkpoint first (python -m rome_flax convert)")
  model = MultiExitBert.from_pretrained(src, load_tokenizer_files=False)
  cfg, info = model.config, model.export_info
  window = tp.serving_window(window, kind_of(cfg).token_level_exit, cfg.num_layers)
  seq = evaluation.max_length_of(model, max_length)
  sizes = tuple(sorted(set(sizes or default_sizes(batch)) | {batch}))
  check_shapes(cfg, slots, batch, sizes, seq)
  criteria = tuple(criteria or default_criteria(cfg))
  check_criteria(cfg, criteria)
  lengths = engine.trim_lengths(seq)
  identity = calibration.export_identity(src)

  from rome_flax.engine import early_exit
  prepared = early_exit.prepare_params(model.params)
  shapes = dict(slots=slots, batch=batch, sizes=sizes, lengths=lengths, criteria=criteria, window=window)
  try:
    platforms = PLATFORMS
    exported = exported_functions(prepared, cfg, platforms=platforms, **shapes)
  except Exception as e:   # a jax without an accelerator's lowering rules: the CPU alone (a real bug fails again)
    log.info("lowering for %s failed (%s); exporting for cpu alone", ", ".join(PLATFORMS), e)
    platforms = ("cpu",)
    exported = exported_functions(prepared, cfg, platforms=platforms, **shapes)
  params_bytes, leaves = _params_npz(jax.tree_util.tree_flatten_with_path(jax.device_get(prepared))[0])
  blobs = {PARAMS: params_bytes, RUNTIME: Path(runtime.__file__).read_bytes()}
  blobs.update({f"{FUNCTIONS}/{name}.jax": bytes(exp.serialize()) for name, exp in exported.items()})
  tokenizer_files = sorted({p for g in TOKENIZER_FILES for p in src.glob(g) if p.is_file()})
  manifest = {
      "format": runtime.FORMAT, "jax_version": jax.__version__, "platforms": list(platforms),
      "export": {"source": str(src.absolute()), "identity": identity, "metadata": info.to_dict()},
      "model": {"model_type": cfg.model_type, "num_layers": cfg.num_layers, "num_exits": cfg.num_exits,
                "num_labels": cfg.num_labels, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                "pad_token_id": cfg.pad_token_id, "type_vocab_size": cfg.type_vocab_size,
                "max_position_embeddings": cfg.max_position_embeddings, "head": cfg.head,
                "exit_pooling": cfg.exit_pooling, "dtype": cfg.dtype, "is_regression": cfg.is_regression,
                "is_token_task": kind_of(cfg).token_level_exit},
      "label_names": list(info.label_names) if len(info.label_names) == cfg.num_labels else None,
      "slots": slots, "seq": seq, "batch": batch, "sizes": list(sizes), "lengths": list(lengths),
      "tiers": [[rows, list(cuts)] for rows, cuts in run_tiers(sizes, batch)],
      "criteria": list(criteria), "pick": PICK, "window": window if "tokee" in criteria else None,
      "state": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for init in ("init", "init_tokee")
                if init in exported for k, v in exported[init].out_tree.unflatten(exported[init].out_avals).items()},
      "params": {"file": PARAMS, "layout": "per-layer (early_exit.prepare_params)", "leaves": leaves},
      "functions": {name: {"file": f"{FUNCTIONS}/{name}.jax",
                           "params": _takes_params(name),   # then the parameters come first
                           "inputs": [f"{a.dtype}{list(a.shape)}" for a in
                                      exp.in_avals[len(leaves) if _takes_params(name) else 0:]],
                           "outputs": [f"{a.dtype}{list(a.shape)}" for a in exp.out_avals]}
                    for name, exp in exported.items()},
  }
  with RunLock(out):
    files.settle_output(out)
    check_out()   # again, now that no other command can write there
    with files.staged_output(out, KIND, commit_if=preemption.check_interrupted) as stage:
      (stage / FUNCTIONS).mkdir()
      for rel, data in blobs.items():
        files.atomic_write_bytes(stage / rel, data)
      for p in tokenizer_files:
        try:
          shutil.copyfile(p, stage / p.name)
        except OSError as e:
          raise RomeFlaxError(f"cannot copy {p} into {out}: {e.strerror or e}") from None
      listed = sorted(list(blobs) + [p.name for p in tokenizer_files])
      manifest["files"] = {rel: {"bytes": (stage / rel).stat().st_size, "sha256": runtime.sha256_of(stage / rel)}
                           for rel in listed}
      files.write_json(stage / runtime.MANIFEST, manifest)   # last: it lists every file above
  if say is not None:
    size = sum(e["bytes"] for e in manifest["files"].values())
    say(f"exported {src} -> {out}: {len(exported)} functions for {', '.join(platforms)} (slots {slots}, batch "
        f"{batch}, sizes {','.join(map(str, sizes))}, lengths {','.join(map(str, lengths))}; criteria "
        f"{','.join(criteria)}), {len(tokenizer_files)} tokenizer files, {size / 2 ** 20:.1f} MiB")
  return out
