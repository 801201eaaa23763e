"""The package's import graph has no cycle: each module depends only on modules below it.

Read from the source with `ast`, so imports inside functions (which hide a cycle until the function
runs) count as much as the ones at the top of a module.
"""

import ast
import dataclasses
from pathlib import Path

PACKAGE = "rome_flax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


# The layers, lowest first (issue 19: a layout that shows the architecture). A module imports only from
# its own layer and the ones below; the top (the package itself: entry programs, cli, report, study, server)
# may import anything. `base` is errors / runtime / progress, which import nothing of rome_flax's.
LAYERS = ("base", "io", "model", "kinds", "engine", "train", "top")
BASE = {"errors", "runtime", "progress"}


def module_name(p: Path) -> str:
  parts = p.relative_to(ROOT).with_suffix("").parts
  parts = parts[:-1] if parts[-1] == "__init__" else parts
  return ".".join((PACKAGE,) + parts)


def module_names() -> dict[str, Path]:
  return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> str:
  parts = module.split(".")[1:]
  if len(parts) >= 2 or (parts and parts[0] in LAYERS):
    return parts[0]
  return "base" if parts and parts[0] in BASE else "top"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
  """The package modules that a file imports anywhere (top level, functions, classes)."""
  this = module_name(path)
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: `from . import x`, `from .x import y`
        here = this.split(".") if path.stem == "__init__" else this.split(".")[:-1]
        base = ".".join(filter(None, [*here[:len(here) - node.level + 1], base]))
      # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
      found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
  return {m for m in found if m in modules and m != this}


def import_graph() -> dict[str, set[str]]:
  modules = module_names()
  return {name: imported_modules(path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]):
  """One cycle as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert f"{PACKAGE}.train.trainer" in graph and graph[f"{PACKAGE}.train.trainer"], "the graph was not read"
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_method_hooks_resolve_and_the_trainer_names_no_method():
  """A method's own checks and batch inputs are its registry row's hooks (methods.Method), so trainer.py
  never compares a method's name (issue 19: a thin trainer)."""
  from rome_flax.train import methods, self_sampling
  for method in methods.METHODS.values():
    for which in ("validate", "prepare"):
      fn = method.hook(which)
      assert fn is None or callable(fn), (method.name, which)
  ss = methods.get_method("self_sampling")
  assert (ss.hook("validate"), ss.hook("prepare")) == (self_sampling.validate, self_sampling.prepare)
  source = (ROOT / "train" / "trainer.py").read_text()
  assert not [name for name in methods.METHOD_NAMES if f'"{name}"' in source or f"'{name}'" in source]
  # Its options are a dataclass of its own, not LossConfig fields; the train step reads its batch input
  # through the row's unit_inputs, never by the key's name.
  assert ss.options is methods.SelfSamplingOptions
  assert not {f.name for f in dataclasses.fields(methods.LossConfig)} & {f.name for f in dataclasses.fields(ss.options)}
  for key, _ in ss.unit_inputs:
    assert key not in (ROOT / "train" / "train_step.py").read_text()


def test_a_methods_options_are_a_config_group_with_flat_names():
  """--ss_windows sets the self_sampling group; the flat names of config.json are those of before the group
  (a run saved then resumes), and the trainer hands the group to the method's prepare hook."""
  from rome_flax.train import methods, train_config
  cfg = train_config.TrainConfig().replace(method="self_sampling", ss_windows=["3", 5.0], gamma=0.5)
  assert cfg.self_sampling.ss_windows == (3, 5) and cfg.objective.gamma == 0.5
  assert cfg.method_options(methods.get_method("self_sampling")) is cfg.self_sampling
  assert cfg.method_options(methods.get_method("romebert")) is None
  flat = cfg.to_dict()
  assert {"ss_windows", "ss_thresholds", "ss_sandwich_small", "ss_sandwich_full", "ss_upper_cap", "gamma"} <= set(flat)
  assert train_config.TrainConfig.from_dict(flat) == cfg
  loss = cfg.loss_config(regression=True, regression_scale=2.0)
  assert isinstance(loss, methods.Objective) and (loss.gamma, loss.regression_scale) == (0.5, 2.0)
  assert train_config.dotted_name("ss_upper_cap") == "self_sampling.ss_upper_cap"


def test_each_layer_imports_only_the_layers_below_it():
  """io < model < kinds < engine < train < the entry programs (docs/design.md draws it)."""
  graph = import_graph()
  assert {layer_of(m) for m in graph} == set(LAYERS), sorted({layer_of(m) for m in graph})
  upward = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
            if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))]
  assert not upward, "imports from a higher layer: " + "; ".join(upward)
