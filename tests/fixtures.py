"""Builders for test fixtures that need no downloads: tokenizer, tiny configs, real photos."""
import os

import numpy as np

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What color is the square? ASSISTANT: The square is red.",
    "Human: What is in the image?###Assistant: A cat sitting on a couch.###",
    "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> describe [/INST]",
    "Question: Which of these states is farthest north? Context: N/A Options: (A) Utah (B) Maine",
    "The answer is A. There are three circles, a blue triangle and two green squares on the left.",
    "the quick brown fox jumps over the lazy dog 0123456789 ü é ñ 日本語 emoji",
]


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 512) -> str:
  """Train a SentencePiece BPE model with LLaMA's special ids into `out_dir/tokenizer.model`."""
  import sentencepiece as spm
  path = os.path.join(out_dir, "tokenizer.model")
  if not os.path.exists(path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 20), model_prefix=os.path.join(out_dir, "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  return out_dir


def photo(name: str = "astronaut") -> np.ndarray:
  """A real photo as uint8 [H, W, 3] from skimage (offline): astronaut, chelsea or coffee."""
  from skimage import data
  return getattr(data, name)()
