"""Shared test fixtures: paths into ../shared and the real SmolLM2-135M model folder."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BEAR_SHARED", REPO.parent / "shared")).resolve()
SMOLLM2_DIR = Path(os.environ.get("BEAR_SMOLLM2", Path.home() / ".cache" / "bear-tests" / "smollm2"))

sys.path.insert(0, str(REPO))  # the stages are flat files at the repo root


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"../shared not found at {SHARED} (set BEAR_SHARED)"
    return SHARED


@pytest.fixture(scope="session")
def data_root(shared_dir) -> Path:
    return shared_dir / "data" / "amazon"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(shared_dir) -> Path:
    return shared_dir / "tokenizers" / "llama3"


@pytest.fixture(scope="session")
def smollm2_dir(shared_dir) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, built once from the GGUF in ../shared (about 10 s)."""
    if not (SMOLLM2_DIR / "model.safetensors").exists():
        subprocess.run([sys.executable, str(shared_dir / "tools" / "smollm2-hf"), str(SMOLLM2_DIR)], check=True)
    return SMOLLM2_DIR
