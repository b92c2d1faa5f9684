"""Shared fixtures: the local GSM8K copy and a tiny JSONL dataset with short problems."""

import json
from pathlib import Path

import pytest

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


@pytest.fixture
def gsm8k_dir() -> Path:
    """../shared/data/gsm8k beside the project (skip when absent)."""
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.skip(f"GSM8K copy not found at {GSM8K_DIR}")
    return GSM8K_DIR


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A dir with train.jsonl / test.jsonl of short sums (short prompts keep the byte-level model fast)."""
    for split, offset in (("train", 0), ("test", 50)):
        rows = [{"question": f"{a}+{a + 1}?", "answer": f"#### {2 * a + 1}"} for a in range(offset, offset + 20)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path
