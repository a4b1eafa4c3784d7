"""The package's dependency direction: config / parallel → models → data, checkpoints → infer → eval, datagen →
train → scale → main. Every import of a llava_jax module (top-level or inside a function) must point to the same
layer or a lower one, so the layers can be read, tested and replaced bottom-up."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llava_jax")

# module or package (dotted, under llava_jax) → layer; the longest matching prefix wins
LAYERS = {
    "config": 0, "limits": 0, "errors": 0, "paths": 0, "parallel": 0, "openai_client": 0, "recipes": 0,
    "config_files": 0, "configs": 0, "allocator": 0,
    "models": 1,
    "data": 2, "checkpoints": 2,
    "infer": 3,
    "eval": 4, "datagen": 4,
    "train": 5,
    "scale": 6,
    "cli_errors": 7, "main": 7, "__init__": 7,
}


def layer_of(module: str) -> int:
  parts = module.split(".")[1:]  # drop 'llava_jax'
  for n in range(len(parts), 0, -1):
    key = ".".join(parts[:n])
    if key in LAYERS:
      return LAYERS[key]
  raise KeyError(f"{module}: not in tests/test_layers.py's LAYERS (add its layer)")


def imports_of(path: str, module: str):
  """Every llava_jax module imported by the file (absolute imports; `from llava_jax import x` → llava_jax.x)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("llava_jax."):
          yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "llava_jax":
        for a in node.names:
          yield node.lineno, f"llava_jax.{a.name}"
      elif node.module.startswith("llava_jax."):
        yield node.lineno, node.module


def package_modules():
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield path, rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def test_every_module_has_a_layer():
  for _, module in package_modules():
    if module != "llava_jax":
      layer_of(module)


def test_no_module_imports_upward():
  upward = []
  for path, module in package_modules():
    if module == "llava_jax":
      continue
    mine = layer_of(module)
    for line, target in imports_of(path, module):
      if layer_of(target) > mine:
        upward.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} (layer {layer_of(target)} > {mine})")
  assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name", ["infer", "eval", "data", "models", "checkpoints"])
def test_lower_layers_never_import_train(name):
  """The issue's check: nothing below train imports it (a cycle through train/loop existed)."""
  for path, module in package_modules():
    if module.startswith(f"llava_jax.{name}"):
      assert not [t for _, t in imports_of(path, module) if t.startswith("llava_jax.train")], path


READERS = ("load_pretrained", "restore_params")  # checkpoint readers; placing in-memory params is not reading


def test_weights_are_read_by_one_loader():
  """Training init, eval, chat and serve read weights through `checkpoints.load.load_params` only: outside
  llava_jax/checkpoints no module calls the readers it is built on."""
  calls = []
  for path, module in package_modules():
    if module.startswith("llava_jax.checkpoints"):
      continue
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
      if isinstance(node, ast.Call):
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if name in READERS:
          calls.append(f"{module}:{node.lineno} {name}")
  assert not calls, calls
