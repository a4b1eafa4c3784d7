"""Test set-up: 8 simulated CPU devices (before jax is imported) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  """Directory holding a tiny SentencePiece BPE `tokenizer.model` (LLaMA conventions: unk 0, bos 1, eos 2)."""
  return fixtures.train_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
  """transformers LlamaTokenizer over the tiny BPE model, add_bos_token=True, like LLaVA's."""
  from transformers import LlamaTokenizer
  return LlamaTokenizer.from_pretrained(tiny_tokenizer_dir, add_bos_token=True)
