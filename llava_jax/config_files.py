"""Recipe config files (`configs/<name>.py[:arg]`), found in a checkout or in the installed package.

The repository's `configs/` directory is installed as the package `llava_jax.configs` (setup.py), so
`python -m llava_jax.main --config=configs/demo.py` and the notebooks work outside a checkout: a `configs/...`
path that does not exist relative to the working directory is looked up among the installed configs.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Sequence

CONFIGS_PREFIX = "configs/"


def installed_configs_dir() -> str:
  """The directory of the installed `llava_jax.configs` package (the repository's configs/ in a checkout)."""
  spec = importlib.util.find_spec("llava_jax.configs")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("llava_jax.configs is not installed (pip install the package)")
  return list(spec.submodule_search_locations)[0]


def resolve(spec: str) -> str:
  """`path[:arg]` → the same with `path` found: as given when it exists (after `~` expansion), else a
  `configs/<name>.py` among the installed configs; unchanged when neither exists (the loader reports it)."""
  path, sep, arg = spec.partition(":")
  path = os.path.expanduser(path)
  if os.path.exists(path) or not path.replace(os.sep, "/").startswith(CONFIGS_PREFIX):
    return path + sep + arg
  try:
    candidate = os.path.join(installed_configs_dir(), path[len(CONFIGS_PREFIX):])
  except FileNotFoundError:
    return path + sep + arg
  return (candidate if os.path.exists(candidate) else path) + sep + arg


def resolve_argv(argv: Sequence[str], flag: str = "config") -> List[str]:
  """argv with the value of `--<flag>=spec` / `--<flag> spec` passed through `resolve`."""
  out, it = [], iter(argv)
  for a in it:
    if a.startswith(f"--{flag}="):
      a = f"--{flag}=" + resolve(a.split("=", 1)[1])
    elif a == f"--{flag}":
      out.append(a)
      a = resolve(next(it, ""))
    out.append(a)
  return out


def load(spec: str):
  """`configs/<name>.py[:arg]` (resolved as above) → its `get_config(arg)` ConfigDict (`get_config()` without arg)."""
  path, _, arg = resolve(spec).partition(":")
  name = "llava_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"no config file {spec!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
