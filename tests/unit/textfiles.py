"""Small text corpora written by the data tests (tests/unit/test_data.py, test_data_formats.py)."""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch

from node.training.data import TextData

SEQ = 16
WIN = SEQ + 1


def random_text(n: int, seed: int) -> bytes:
    # Random letters: any 17-byte window is, in practice, unique to its place in the corpus.
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " \n") for _ in range(n)).encode()


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def corpus_bytes(data: TextData) -> bytes:
    # The NUL separator keeps a match from straddling two files.
    return b"\n\0".join(Path(f).read_bytes() for f in data.files)


def block_texts(data: TextData, held_out: bool) -> list[bytes]:
    return [data._read_block(k) for k in data._block_indices(held_out)]


def check_batch(batch: torch.Tensor, rows: int) -> None:
    assert batch.shape == (rows, WIN) and batch.dtype == torch.int64
    assert int(batch.min()) >= 0 and int(batch.max()) <= 255
