"""Every bad input to train.py and infer.py is one `error:` line and exit code 2, with no traceback,
and leaves every earlier output byte-identical (and no new output directory behind).

One module-scoped world holds a finished tiny run, its export, damaged copies of both, earlier
infer results and data files good and bad; each case runs a CLI in-process against it and hashes
the world before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import infer
import train
from rome_flax.__main__ import main as rome_main
from rome_flax.io import integrity

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--random_model_layers", "2", "--random_model_hidden", "16", "--random_model_heads", "2",
        "--random_model_intermediate", "32", "--train_rows", "64", "--max_length", "16", "--batch_size", "8",
        "--epochs", "1", "--eval_every", "0", "--method", "joint", "--gr", "none", "--no_progress"]
SST_HEADER = "sentence\tlabel"
# A CoNLL NER file (WORD TAG, a blank line between sentences): tags O, B-LOC, B-PER, I-PER
TOKEN_TRAIN = "".join(f"{s}\n" for s in [
    "the O\ngood B-PER\nfine I-PER\nwas O\nbad B-LOC\n", "a O\nfilm O\nof O\ngreat B-PER\n",
    "the O\nplot O\nis O\ndull B-LOC\n", "lovely B-PER\nwarm I-PER\nand O\nthe O\ncast O\n"] * 4)


RUN_FLAGS = [*TINY, "--save_every", "4", "--keep_checkpoints", "2"]   # the world's finished run


def garble(path: Path, at: int = 0, n: int = 64) -> None:
  data = bytearray(path.read_bytes())
  at = min(at, max(len(data) - n, 0))
  data[at:at + n] = bytes((b ^ 0x5A) for b in data[at:at + n])
  path.write_bytes(bytes(data))


def largest_file(directory: Path) -> Path:
  return max((p for p in directory.rglob("*") if p.is_file() and p.name != integrity.MANIFEST),
             key=lambda p: p.stat().st_size)


def digest(root: Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


class World:
  def __init__(self, root: Path):
    self.root = root
    self.run = root / "run"
    self.export = self.run / "export"
    self.data = root / "data"
    self.token_run = root / "token_run"
    self.token_export = self.token_run / "export"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
  w = World(tmp_path_factory.mktemp("world"))
  assert train.main([*RUN_FLAGS, "--output_dir", str(w.run)]) == 0
  d = w.data
  d.mkdir()
  # sequence labelling: CoNLL directories (WORD TAG lines) good and bad, and a token-task export
  for name, splits in {
      "tok_ok": {},
      "tok_onecol_first": {"train.txt": "the\ngood O\n\n"},
      "tok_onecol": {"train.txt": "the O\ngood B-PER\nfilm\n\n"},
      "tok_threecol": {"train.txt": "the O\ngood B-PER\nfilm NN O\n\n"},
      "tok_latin1_dev": {"dev.txt": "the O\ngood B-PER\n\ncaf\xe9 O\n\n".encode("latin-1")},
      "tok_new_tag_dev": {"dev.txt": "the O\ngood B-PER\n\nthe O\nbad B-ORG\n\n"},
      "tok_long": {"train.txt": TOKEN_TRAIN + "".join(f"{w} O\n" for w in ["the", "film"] * 10) + "\n"},
  }.items():
    (d / name).mkdir()
    for split, text in {"train.txt": TOKEN_TRAIN, "dev.txt": TOKEN_TRAIN, "test.txt": TOKEN_TRAIN, **splits}.items():
      (d / name / split).write_bytes(text if isinstance(text, bytes) else text.encode())
  (d / "empty_tokens.jsonl").write_text('{"tokens": ["good", "film"], "tags": ["B-PER", "O"]}\n'
                                        '{"tokens": [], "tags": []}\n')
  assert train.main([*TINY, "--task", "ner", "--data_dir", str(d / "tok_ok"), "--output_dir", str(w.token_run)]) == 0
  # GLUE SST-2 layouts, good and bad
  for name, lines in {"sst_ok": [SST_HEADER, "good film\t1", "bad film\t0"],
                      "sst_latin1": [SST_HEADER, "good film\t1"], "sst_empty": [],
                      "sst_nocol": ["text\tlabel", "good film\t1"], "sst_short": [SST_HEADER, "good film"],
                      "sst_badlabel": [SST_HEADER, "good film\t7"]}.items():
    (d / name).mkdir()
    (d / name / "train.tsv").write_text("".join(line + "\n" for line in lines))
    (d / name / "dev.tsv").write_text("".join(line + "\n" for line in lines))
  for split in ("train.tsv", "dev.tsv"):
    (d / "sst_latin1" / split).write_bytes(f"{SST_HEADER}\ngood film\t1\ncaf\xe9 cr\xe8me\t0\n".encode("latin-1"))
  (d / "sst_notrain").mkdir()
  (d / "stsb_badscore").mkdir()
  sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
  (d / "stsb_badscore" / "train.tsv").write_text(sts + "0\tg\tf\t2012\t0\tn\tn\tgood\tfine\thigh\n")
  # custom files
  files = {
      "ok.csv": "text,label\ngood film,pos\nbad film,neg\nfine film,pos\n",
      "ok_reg.csv": "text,label\ngood film,1.0\nbad film,0.0\n",
      "nolabel.csv": "text\ngood film\nbad film\n",
      "onelabel.csv": "text,label\ngood film,pos\nfine film,pos\n",
      "notext.csv": "sentence,label\ngood film,pos\nbad film,neg\n",
      "empty.csv": "",
      "header_only.csv": "text,label\n",
      "short_row.csv": "text,label\ngood film,pos\nbad film\n",
      "badscore.csv": "text,label\ngood film,high\n",
      "unknown_label.csv": "text,label\ngood film,meh\n",
      "bad.jsonl": '{"text": "good film", "label": "pos"}\n{"text": "bad film", "label": \n',
      "list.jsonl": '{"text": "good film", "label": "pos"}\n["bad film", "neg"]\n',
      "deep.jsonl": "[" * 100000 + "\n",
      "notes.txt": "good film\n",
      "quote.csv": 'text,label\n"good film,pos\n',
      "bool.jsonl": '{"text": "good film", "label": true}\n{"text": "bad film", "label": false}\n',
      "bool_infer.jsonl": '{"text": "good film", "label": true}\n',
      "ones.jsonl": '{"text": "good film", "label": 1}\n{"text": "bad film", "label": "0"}\n',
  }
  for name, text in files.items():
    (d / name).write_text(text)
  (d / "latin1.csv").write_bytes("text,label\ngood film,pos\ncaf\xe9,neg\n".encode("latin-1"))
  (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1"))
  # infer.py streams its --data_file and stops at the first bad row: these rows are good up to the fault
  (d / "latin1_infer.csv").write_bytes("text,label\ngood film,positive\ncaf\xe9,negative\n".encode("latin-1"))
  (d / "bad_infer.jsonl").write_text('{"text": "good film", "label": "positive"}\n{"text": "bad film", "label": \n')
  (d / "a_dir.csv").mkdir()
  (d / "config_syntax.py").write_text("def get_config(:\n")
  (d / "config_none.py").write_text("X = 1\n")
  (d / "config_unknown.py").write_text("def get_config():\n  return {'epoch': 3}\n")
  (d / "config_list.py").write_text("def get_config():\n  return [1]\n")
  (d / "a_file").write_text("not a directory\n")
  # damaged copies of the export and the run
  exports = w.root / "exports"
  for name in ("garbled", "missing_file", "bad_config", "mismatch", "bad_format", "bad_manifest"):
    shutil.copytree(w.export, exports / name)
  garble(largest_file(exports / "garbled" / "params"))
  os.unlink(exports / "missing_file" / "tokenizer.json")
  for name, edit in (("bad_config", lambda c: "{not json"),
                     ("mismatch", lambda c: json.dumps({**json.loads(c), "model": {
                         **json.loads(c)["model"], "intermediate_size": 48}})),
                     ("bad_format", lambda c: json.dumps({**json.loads(c), "format": "rome_flax/9"}))):
    cfg = exports / name / "rome_flax_config.json"
    cfg.write_text(edit(cfg.read_text()))
    if name != "bad_config":
      os.unlink(exports / name / integrity.MANIFEST)   # as an older rome_flax would have written it
  (exports / "bad_manifest" / integrity.MANIFEST).write_text("{garbled")
  shutil.copytree(w.run, w.root / "run_damaged")
  for step_dir in (w.root / "run_damaged" / "checkpoints").glob("*/[0-9]*"):
    garble(largest_file(step_dir))
  shutil.copytree(w.run, w.root / "run_badconfig")
  (w.root / "run_badconfig" / "config.json").write_text("{garbled")
  (w.root / "foreign").mkdir()
  (w.root / "foreign" / "notes.txt").write_text("someone else's files\n")
  (w.root / "hf_like").mkdir()
  (d / "thresholds_other.json").write_text(json.dumps({"format": "rome_flax_thresholds/1", "setting": {
      "criterion": "entropy", "threshold": 0.1}, "model": {"identity": "0" * 64}}))
  (w.root / "hf_like" / "weights.bin").write_bytes(b"x")
  assert infer.main(["--checkpoint", str(w.export), "--output_dir", str(w.root / "infer_out"), "--limit", "8",
                     "--measure_speed", "none", "--no_progress", "--thresholds", "0.5"]) == 0
  # rome_flax output with someone's files beside it: --overwrite refuses, naming them
  shutil.copytree(w.run, w.root / "run_mixed", ignore=shutil.ignore_patterns("checkpoints"))
  (w.root / "run_mixed" / "thesis.txt").write_text("four years of work\n")
  shutil.copytree(w.root / "infer_out", w.root / "infer_mixed")
  (w.root / "infer_mixed" / "photos").mkdir()
  return w


def t(*args):
  """A train.py case: argv from the world (`w`) and a fresh output directory (`new`)."""
  return ("train", lambda w, new: [*TINY, "--output_dir", str(new), *[a(w) if callable(a) else a for a in args]])


def t_in(out, *args):
  """A train.py case on an existing directory of the world."""
  return ("train", lambda w, new: [*TINY, "--output_dir", str(out(w)), *[a(w) if callable(a) else a for a in args]])


def i(*args, ckpt=lambda w: w.export, out=None):
  """An infer.py case (a fresh output directory unless `out` names one of the world's)."""
  return ("infer", lambda w, new: ["--checkpoint", str(ckpt(w)), "--output_dir", str(out(w) if out else new),
                                   "--limit", "8", "--measure_speed", "none", "--no_progress",
                                   *[a(w) if callable(a) else a for a in args]])


def c(*args, ckpt=lambda w: w.export):
  """A `python -m rome_flax calibrate` case, writing to a fresh --output file."""
  return ("calibrate", lambda w, new: ["--checkpoint", str(ckpt(w)), "--output", str(new), "--no_progress",
                                       *[a(w) if callable(a) else a for a in args]])


D = lambda name: (lambda w: str(w.data / name))
EXPORTS = lambda name: (lambda w: w.root / "exports" / name)
CUSTOM = lambda train_file, *more: t("--task", "custom", "--train_file", D(train_file), *more)

CASES = [
    # --- train.py: options
    ("t_unknown_flag", t("--learning_rat", "1"), "unrecognized arguments"),
    ("t_bad_method", t("--method", "rome"), "method must be one of"),
    ("t_bad_task", t("--task", "sst3"), "unknown task"),
    ("t_int_word", t("--epochs", "two"), "cannot read 'two' as int"),
    ("t_float_word", t("--learning_rate", "fast"), "cannot read 'fast' as float"),
    ("t_bool_word", t("--export", "maybe"), "export"),
    ("t_batch_zero", t("--batch_size", "0"), "batch"),
    ("t_batch_negative", t("--batch_size", "-8"), "batch"),
    ("t_epochs_zero", t("--epochs", "0"), "epochs"),
    ("t_lr_negative", t("--learning_rate", "-1"), "learning_rate"),
    ("t_max_length_small", t("--max_length", "4"), "max_length"),
    ("t_train_rows_negative", t("--train_rows", "-1"), "train_rows must be >= 0"),
    ("t_gamma", t("--gamma", "2.0"), "gamma must be in"),
    ("t_temperature", t("--temperature", "0"), "temperature"),
    ("t_gr", t("--gr", "sideways"), "gr"),
    ("t_protect", t("--protect", "both"), "protect"),
    ("t_kl_reduction", t("--kl_reduction", "sum"), "kl_reduction"),
    ("t_select_by", t("--select_by", "luck"), "select_by"),
    ("t_exit_pooling", t("--exit_pooling", "max"), "exit_pooling"),
    ("t_dtype", t("--dtype", "float16"), "dtype"),
    ("t_accum_split", t("--grad_accum_steps", "3"), "grad_accum_steps"),
    ("t_accum_zero", t("--grad_accum_steps", "0"), "grad_accum_steps"),
    ("t_warmup", t("--warmup_ratio", "1.5"), "warmup_ratio"),
    ("t_keep_negative", t("--keep_checkpoints", "-1", "--max_steps", "1"), "keep_checkpoints"),
    ("t_heads_split", t("--random_model_hidden", "30", "--random_model_heads", "4"), "heads"),
    ("t_one_layer", t("--random_model_layers", "1"), "at least 2 layers"),
    # --- train.py: config files and models
    ("t_config_missing", t("--config", lambda w: str(w.data / "nope.py")), "does not exist"),
    ("t_config_dir", t("--config", lambda w: str(w.data)), "is a directory; pass a Python file"),
    ("t_config_syntax", t("--config", D("config_syntax.py")), "failed to load"),
    ("t_config_no_fn", t("--config", D("config_none.py")), "defines no get_config"),
    ("t_config_unknown_key", t("--config", D("config_unknown.py")), "unknown config key"),
    ("t_config_not_dict", t("--config", D("config_list.py")), "must return a dict"),
    ("t_model_missing", t("--model", lambda w: str(w.root / "no_model")), "no_model"),
    ("t_model_file", t("--model", D("a_file")), "a_file"),
    ("t_model_foreign", t("--model", lambda w: str(w.root / "foreign")), "foreign"),
    ("t_model_positions", t("--model", lambda w: str(w.export), "--max_length", "1000"),
     "exceeds the model's 64 positions"),
    ("t_model_damaged", t("--model", lambda w: str(EXPORTS("garbled")(w))), "is damaged"),
    # --- train.py: GLUE TSV data
    ("t_data_dir_missing", t("--task", "sst-2", "--data_dir", lambda w: str(w.root / "no_glue")), "not a directory"),
    ("t_data_dir_file", t("--task", "sst-2", "--data_dir", D("a_file")), "not a directory"),
    ("t_tsv_missing", t("--task", "sst-2", "--data_dir", D("sst_notrain")), "train.tsv is missing"),
    ("t_tsv_latin1", t("--task", "sst-2", "--data_dir", D("sst_latin1")), "train.tsv:3: not UTF-8"),
    ("t_tsv_empty", t("--task", "sst-2", "--data_dir", D("sst_empty")), "is empty"),
    ("t_tsv_no_column", t("--task", "sst-2", "--data_dir", D("sst_nocol")), "header has no column 'sentence'"),
    ("t_tsv_short_row", t("--task", "sst-2", "--data_dir", D("sst_short")), "train.tsv:2: expected at least 2"),
    ("t_tsv_bad_label", t("--task", "sst-2", "--data_dir", D("sst_badlabel")), "train.tsv:2: label '7'"),
    ("t_tsv_score", t("--task", "sts-b", "--data_dir", D("stsb_badscore")), "label 'high' is not a number"),
    ("t_synthetic_data_dir", t("--task", "synthetic", "--data_dir", D("sst_ok")), "drop data_dir"),
    # --- train.py: custom files
    ("t_custom_no_file", t("--task", "custom"), "needs train_file"),
    ("t_custom_missing", t("--task", "custom", "--train_file", lambda w: str(w.data / "nope.csv")),
     "nope.csv is missing"),
    ("t_custom_dir", CUSTOM("a_dir.csv"), "a directory"),
    ("t_custom_txt", CUSTOM("notes.txt"), "unsupported file type"),
    ("t_custom_latin1_csv", CUSTOM("latin1.csv"), "latin1.csv:3: not UTF-8"),
    ("t_custom_latin1_jsonl", CUSTOM("latin1.jsonl"), "latin1.jsonl:1: not UTF-8"),
    ("t_custom_bad_json", CUSTOM("bad.jsonl"), "bad.jsonl:2: not valid JSON"),
    ("t_custom_json_list", CUSTOM("list.jsonl"), "list.jsonl:2: expected one JSON object"),
    ("t_custom_deep_json", CUSTOM("deep.jsonl"), "deep.jsonl:1:"),
    ("t_custom_no_label", CUSTOM("nolabel.csv"), "no label column 'label'"),
    ("t_custom_one_label", CUSTOM("onelabel.csv"), "fewer than two distinct labels"),
    ("t_custom_no_text", CUSTOM("notext.csv"), "no column 'text'"),
    ("t_custom_empty", CUSTOM("empty.csv", "--custom_labels", "pos,neg"), "has no rows"),
    ("t_custom_header_only", CUSTOM("header_only.csv", "--custom_labels", "pos,neg"), "has no rows"),
    ("t_custom_short_row", CUSTOM("short_row.csv"), "short_row.csv:3: missing value in column 'label'"),
    ("t_custom_open_quote", CUSTOM("quote.csv", "--custom_labels", "pos,neg"), "quote.csv"),
    ("t_custom_score", CUSTOM("badscore.csv", "--custom_regression", "true"), "label 'high' is not a number"),
    ("t_custom_dev_label", CUSTOM("ok.csv", "--dev_file", D("unknown_label.csv")), "label 'meh' is not one of"),
    ("t_custom_labels_one", CUSTOM("ok.csv", "--custom_labels", "pos"), "at least two label names"),
    ("t_custom_labels_repeat", CUSTOM("ok.csv", "--custom_labels", "pos,pos"), "repeat"),
    ("t_custom_label_not_listed", CUSTOM("ok.csv", "--custom_labels", "a,b"), "label 'pos' is not one of"),
    ("t_custom_bool_labels", CUSTOM("bool.jsonl"), "bool.jsonl:1: label true is a boolean; name the labels"),
    ("t_custom_bool_not_listed", CUSTOM("bool.jsonl", "--custom_labels", "pos,neg"),
     "bool.jsonl:1: label true is a boolean, which is a label only when the label names list it"),
    ("t_custom_labels_same_value", CUSTOM("ones.jsonl", "--custom_labels", "0,1,1.0"),
     "ones.jsonl:1: label 1 matches label names '1', '1.0', which denote the same value"),
    # --- train.py: sequence labelling (CoNLL / JSON Lines files)
    ("t_conll_one_column_first", t("--task", "ner", "--data_dir", D("tok_onecol_first")),
     "tok_onecol_first/train.txt:1: one column: no tag"),
    ("t_conll_one_column", t("--task", "ner", "--data_dir", D("tok_onecol")),
     "tok_onecol/train.txt:3: expected 2 columns (as on line 1), found 1"),
    ("t_conll_three_columns", t("--task", "ner", "--data_dir", D("tok_threecol")),
     "tok_threecol/train.txt:3: expected 2 columns (as on line 1), found 3"),
    ("t_conll_latin1_dev", t("--task", "ner", "--data_dir", D("tok_latin1_dev")),
     "tok_latin1_dev/dev.txt:4: not UTF-8"),
    ("t_conll_dev_tag", t("--task", "ner", "--data_dir", D("tok_new_tag_dev")),
     "tok_new_tag_dev/dev.txt:5: tag 'B-ORG' is not in the training tag set"),
    ("t_jsonl_empty_tokens", t("--task", "ner", "--train_file", D("empty_tokens.jsonl")),
     "empty_tokens.jsonl:2: empty sentence"),
    ("t_token_too_long", t("--task", "ner", "--data_dir", D("tok_long")), "more than max_length 16; raise --max_length"),
    ("t_stage2_without_stage1", t("--task", "ner", "--data_dir", D("tok_ok"), "--method", "self_sampling"),
     "self_sampling fine-tunes a finished stage-1 run"),
    ("t_stage2_sentence_task", t("--method", "self_sampling"), "self_sampling is token-level early exit's fine-tuning"),
    ("t_ss_even_window", t("--task", "ner", "--data_dir", D("tok_ok"), "--method", "self_sampling",
                           "--ss_windows", "4,5"), "ss_windows must be odd"),
    ("t_sentence_model_token_task", t("--task", "sst-2", "--data_dir", D("sst_ok"),
                                      "--model", lambda w: str(w.token_export)), "has token exits"),
    # --- train.py: output directories
    ("t_out_is_file", ("train", lambda w, new: [*TINY, "--output_dir", str(w.data / "a_file")]), "is a file"),
    ("t_out_under_file", ("train", lambda w, new: [*TINY, "--output_dir", str(w.data / "a_file" / "run")]),
     "a_file"),
    ("t_out_holds_run", t_in(lambda w: w.run), "already holds a run"),
    ("t_resume_other_config", t_in(lambda w: w.run, "--resume", "--learning_rate", "0.5"),
     "config differs in learning_rate"),
    ("t_resume_foreign", t_in(lambda w: w.root / "foreign", "--resume"), "holds no config.json"),
    ("t_resume_bad_config", t_in(lambda w: w.root / "run_badconfig", "--resume"), "config.json is unreadable"),
    ("t_out_empty", ("train", lambda w, new: [*TINY, "--output_dir", ""]), "--output_dir is empty"),
    ("t_resume_and_overwrite", t_in(lambda w: w.run, "--resume", "--overwrite"), "pass one of them"),
    ("t_overwrite_foreign", t_in(lambda w: w.root / "foreign", "--overwrite"),
     "foreign was not written by rome_flax (no rome_flax_output.json); it holds notes.txt, which --overwrite never"),
    ("t_overwrite_mixed", t_in(lambda w: w.root / "run_mixed", "--overwrite"),
     "run_mixed also holds thesis.txt, which rome_flax did not write"),
    ("t_overwrite_infer_results", t_in(lambda w: w.root / "infer_out", "--overwrite"),
     "infer_out holds rome_flax infer output, not train output"),
    ("t_max_steps_zero", t("--max_steps", "0"), "--max_steps must be >= 1, got 0"),
    ("t_max_steps_negative", t("--max_steps", "-3"), "--max_steps must be >= 1, got -3"),
    ("t_resume_all_damaged", ("train", lambda w, new: [
        *RUN_FLAGS, "--output_dir", str(w.root / "run_damaged"), "--resume"]), "no intact checkpoint"),
    # --- infer.py: checkpoints
    ("i_missing", i(ckpt=lambda w: w.root / "nope"), "does not exist"),
    ("i_file", i(ckpt=lambda w: w.data / "a_file"), "is a file"),
    ("i_foreign", i(ckpt=lambda w: w.root / "hf_like"), "neither a rome_flax export"),
    ("i_garbled", i(ckpt=EXPORTS("garbled")), "is damaged: params/"),
    ("i_missing_file", i(ckpt=EXPORTS("missing_file")), "is damaged: tokenizer.json is missing"),
    ("i_bad_config", i(ckpt=EXPORTS("bad_config")), "is damaged: rome_flax_config.json"),
    ("i_mismatch", i(ckpt=EXPORTS("mismatch")), "do not match its rome_flax_config.json"),
    ("i_bad_format", i(ckpt=EXPORTS("bad_format")), "format 'rome_flax/9'"),
    ("i_bad_manifest", i(ckpt=EXPORTS("bad_manifest")), "rome_flax_checksums.json is unreadable"),
    ("i_run_dir", i(ckpt=lambda w: w.run), "is a train.py run directory; pass its export: --checkpoint "),
    # --- infer.py: options
    ("i_unknown_flag", i("--thresh", "0.1"), "unrecognized arguments"),
    ("i_thresholds_word", i("--thresholds", "0.1,abc"), "does not parse"),
    ("i_thresholds_empty", i("--thresholds", ""), "threshold"),
    ("i_thresholds_too_many", i("--thresholds", "0.1:0.2:0.3:0.4"), "exit"),
    ("i_thresholds_repeat", i("--thresholds", "0.1,0.10,1e-1"), "repeats the setting '0.10'; give each once"),
    ("i_criterion", i("--criterion", "confidence"), "unknown criterion"),
    ("i_two_criteria_thresholds", i("--criterion", "entropy,maxprob", "--thresholds", "0.1"), "one criterion"),
    ("i_metric_on_test", i("--split", "test", "--metric", "accuracy"), "has no labels"),
    ("i_metric_unknown", i("--metric", "bleu"), "not 'bleu'"),
    ("i_batch_zero", i("--batch_size", "0"), "batch_size"),
    ("i_batch_word", i("--batch_size", "lots"), "invalid int value"),
    ("i_limit_zero", i("--limit", "0"), "--limit must be >= 1"),
    ("i_latency_zero", i("--latency_examples", "0"), "latency_examples"),
    ("i_repeats_zero", i("--speed_repeats", "0"), "speed_repeats"),
    ("i_chunk_zero", i("--chunk_size", "0"), "chunk_size"),
    ("i_devices_zero", i("--devices", "0"), "devices"),
    ("i_devices_many", i("--devices", "99"), "devices"),
    ("i_measure_speed", i("--measure_speed", "fast"), "invalid choice"),
    ("i_min_exit_zero", i("--min_exit_layer", "0"), "min_exit_layer"),
    ("i_min_exit_high", i("--min_exit_layer", "9"), "min_exit_layer"),
    ("i_max_length_high", i("--max_length", "1000"), "max_length 1000 exceeds the model's 64 positions"),
    ("i_max_length_small", i("--max_length", "4"), "--max_length must be at least 8"),
    ("i_max_length_zero", i("--max_length", "0"), "--max_length must be at least 8"),
    # --- infer.py: tasks and data
    ("i_split_validation", i("--split", "validation"), "task synthetic has no split 'validation'"),
    ("i_split_unknown", i("--split", "holdout"), "no split 'holdout'"),
    ("i_task_unknown", i("--task", "sst3"), "unknown task"),
    ("i_task_labels", i("--task", "mnli"), "task mnli has 3 label(s) but the checkpoint's exits have 2"),
    ("i_glue_no_dir", i("--task", "sst-2", "--data_dir", lambda w: str(w.root / "no_glue")), "not a directory"),
    ("i_glue_latin1", i("--task", "sst-2", "--data_dir", D("sst_latin1")), "dev.tsv:3: not UTF-8"),
    ("i_glue_bad_label", i("--task", "sst-2", "--data_dir", D("sst_badlabel")), "label '7'"),
    ("i_custom_no_file", i("--task", "custom"), "needs --data_file"),
    ("i_data_file_missing", i("--data_file", lambda w: str(w.data / "nope.csv")), "nope.csv is missing"),
    ("i_data_file_latin1", i("--data_file", D("latin1_infer.csv")), "latin1_infer.csv:3: not UTF-8"),
    ("i_data_file_bad_json", i("--data_file", D("bad_infer.jsonl")), "bad_infer.jsonl:2: not valid JSON"),
    ("i_data_file_no_text", i("--data_file", D("notext.csv")), "no column 'text'"),
    ("i_data_file_label", i("--data_file", D("ok.csv")), "ok.csv:2: label 'pos' is not one of"),
    ("i_data_file_empty", i("--data_file", D("empty.csv")), "has no rows"),
    ("i_data_file_txt", i("--data_file", D("notes.txt")), "unsupported file type"),
    ("i_data_file_dir", i("--data_file", D("a_dir.csv")), "a directory"),
    ("i_data_file_no_label", i("--data_file", D("nolabel.csv")), "no label column"),
    ("i_data_file_bool_label", i("--data_file", D("bool_infer.jsonl")), "bool_infer.jsonl:1: label true is a boolean"),
    ("i_regression_criterion", i("--criterion", "entropy", "--task", "custom", "--data_file", D("ok_reg.csv")),
     "label"),
    # --- infer.py: sequence labelling against the wrong kind of export or option
    ("i_token_patience", i("--criterion", "patience", "--data_dir", D("tok_ok"), ckpt=lambda w: w.token_export),
     "criterion 'patience' is for sentence tasks"),
    ("i_pool_sentence_export", i("--pool", "avg"), "pool (how a sentence pools its words' uncertainties) is for token tasks"),
    ("i_ner_sentence_export", i("--task", "ner", "--data_dir", D("tok_ok")), "needs a model with token exits"),
    ("i_tokee_even_window", i("--tokee_windows", "4", "--data_dir", D("tok_ok"), ckpt=lambda w: w.token_export),
     "window must be an odd whole number"),
    ("i_tokee_empty_thresholds", i("--tokee_windows", "3", "--tokee_thresholds", ",", "--data_dir", D("tok_ok"),
                                   ckpt=lambda w: w.token_export), "has an empty item"),
    ("i_tokee_sentence_export", i("--tokee_windows", "3"), "is for token tasks"),
    ("i_token_export_sst2", i("--task", "sst-2", "--data_dir", D("sst_ok"), ckpt=lambda w: w.token_export),
     "has token exits"),
    # --- infer.py: output directories
    ("i_out_holds_results", i(out=lambda w: w.root / "infer_out"), "already holds results"),
    ("i_out_is_file", i(out=lambda w: w.data / "a_file"), "is a file"),
    ("i_out_under_file", i(out=lambda w: w.data / "a_file" / "out"), "a_file"),
    ("i_out_empty", ("infer", lambda w, new: [
        "--checkpoint", str(w.export), "--output_dir", "", "--limit", "8", "--measure_speed", "none"]),
     "--output_dir is empty"),
    ("i_overwrite_foreign", i("--overwrite", out=lambda w: w.root / "foreign"),
     "foreign was not written by rome_flax (no rome_flax_output.json); it holds notes.txt"),
    ("i_overwrite_mixed", i("--overwrite", out=lambda w: w.root / "infer_mixed"),
     "infer_mixed also holds photos, which rome_flax did not write"),
    ("i_overwrite_run", i("--overwrite", out=lambda w: w.run), "holds rome_flax train output, not infer output"),
    ("i_thresholds_file_other_model", i("--thresholds_file", D("thresholds_other.json")),
     "was calibrated for another model"),
    ("i_thresholds_file_malformed", i("--thresholds_file", D("ok.csv")), "is malformed"),
    ("i_thresholds_file_missing", i("--thresholds_file", D("nope.json")), "does not exist"),
    # --- python -m rome_flax calibrate
    ("c_epsilon_high", c("--target", "consistency", "--epsilon", "1.5"), "--epsilon must be in (0, 1), got 1.5"),
    ("c_epsilon_zero", c("--target", "risk", "--epsilon", "0", "--delta", "0.1"), "--epsilon must be in (0, 1)"),
    ("c_delta_one", c("--target", "risk", "--epsilon", "0.1", "--delta", "1"), "--delta must be in (0, 1), got 1.0"),
    ("c_no_epsilon", c("--target", "consistency"), "--target consistency needs --epsilon"),
    ("c_no_speedup", c("--target", "speed"), "--target speed needs --speedup"),
    ("c_target", c("--target", "fast"), "invalid choice"),
    ("c_criterion", c("--target", "speed", "--speedup", "2", "--criterion", "confidence"), "unknown criterion"),
    ("c_risk_unlabelled", c("--target", "risk", "--epsilon", "0.1", "--delta", "0.1", "--split", "test"),
     "split 'test' has no labels"),
    ("c_n_too_small", c("--target", "consistency", "--epsilon", "0.01", "--skip_rows", "100", "--rows", "20"),
     "n=20 can certify epsilon >= 0.04762"),
    ("c_rows_past_split", c("--target", "speed", "--speedup", "2", "--skip_rows", "5000"), "the split has only"),
    ("c_run_dir", c("--target", "speed", "--speedup", "2", ckpt=lambda w: w.run), "is a train.py run directory"),
    ("c_hf_dir", c("--target", "speed", "--speedup", "2", ckpt=lambda w: w.root / "hf_like"),
     "neither a rome_flax export"),
    ("c_tokee_sentence_export", c("--target", "speed", "--speedup", "2", "--criterion", "tokee"),
     "criterion 'tokee' (token-level early exit) is for token tasks"),
    ("c_patience_token_export", c("--target", "speed", "--speedup", "2", "--criterion", "patience",
                                  "--data_dir", D("tok_ok"), ckpt=lambda w: w.token_export),
     "criterion 'patience' is for sentence tasks"),
    ("c_tolerance_classes", c("--target", "consistency", "--epsilon", "0.1", "--tolerance", "0.5"),
     "--tolerance is for regression tasks"),
    ("c_output_dir", ("calibrate", lambda w, new: ["--checkpoint", str(w.export), "--output", str(w.data),
                                                   "--target", "speed", "--speedup", "2"]), "is a directory"),
]


NAMES = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]


def run_cli(main, argv) -> int:
  """A CLI's exit code in-process (argparse's mistakes exit through SystemExit)."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def test_there_are_enough_cases():
  assert len(NAMES) >= 96 and len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("name,case,message", CASES, ids=NAMES)
def test_bad_input_is_one_line(world, tmp_path, capsys, name, case, message):
  cli, argv = case
  new = tmp_path / "new_out"
  before = digest(world.root)
  mains = {"train": train.main, "infer": infer.main, "calibrate": lambda a: rome_main(["calibrate", *a])}
  code = run_cli(mains[cli], argv(world, new))
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
  assert message in err[0], err[0]
  assert digest(world.root) == before, "an earlier output changed"
  assert not new.exists(), "a failed run left an output directory behind"


def test_debug_shows_the_traceback(world, tmp_path):
  """In a real process: one line on stderr without --debug, the traceback with it."""
  argv = [sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(EXPORTS("garbled")(world)),
          "--output_dir", str(tmp_path / "o")]
  plain = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
  debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, cwd=ROOT)
  assert plain.returncode == debug.returncode == 2
  assert plain.stderr.strip().startswith("error: export ") and len(plain.stderr.strip().splitlines()) == 1
  assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1].startswith("error: export ")
  assert not (tmp_path / "o").exists()
