"""The recipe files of configs/ by path, for the table generators (`scale.table`, `scale.finetune_table`)."""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(path: str):
  """configs/<name>.py[:arg] (relative to the checkout) → its ConfigDict."""
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("recipe_" + os.path.basename(file)[:-3], os.path.join(REPO, file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
