"""Unit tests for streaming training text from local files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from node.training.data import DataError, TextData
from tests.unit.textfiles import SEQ, WIN, block_texts, check_batch, corpus_bytes, random_text, write_file


def test_single_file(tmp_path: Path) -> None:
    f = write_file(tmp_path / "a.txt", random_text(5000, 0))
    data = TextData(str(f), SEQ, seed=1)
    assert data.files == [str(f)] and data.total_bytes == 5000
    batches = data.train_batches(8)
    corpus = corpus_bytes(data)
    for _ in range(5):
        batch = next(batches)
        check_batch(batch, 8)
        for row in batch.tolist():
            assert bytes(row) in corpus


def test_directory_skips_hidden_binary_and_empty(tmp_path: Path) -> None:
    write_file(tmp_path / "b.txt", random_text(3000, 1))
    write_file(tmp_path / "sub" / "a.md", random_text(3000, 2))
    write_file(tmp_path / ".hidden.txt", random_text(3000, 3))
    write_file(tmp_path / ".git" / "config", random_text(3000, 4))
    write_file(tmp_path / "blob.bin", b"abc\0def" * 100)
    write_file(tmp_path / "empty.txt", b"")
    data = TextData(str(tmp_path), SEQ)
    assert data.files == sorted([str(tmp_path / "b.txt"), str(tmp_path / "sub" / "a.md")])
    assert data.total_bytes == 6000
    check_batch(next(data.train_batches(4)), 4)


def test_glob(tmp_path: Path) -> None:
    write_file(tmp_path / "x" / "one.txt", random_text(2000, 5))
    write_file(tmp_path / "x" / "y" / "two.txt", random_text(2000, 6))
    write_file(tmp_path / "x" / "skip.md", random_text(2000, 7))
    data = TextData(str(tmp_path / "**" / "*.txt"), SEQ)
    assert [Path(f).name for f in data.files] == ["one.txt", "two.txt"]
    check_batch(next(data.train_batches(2)), 2)


def test_missing_path_empty_glob_and_binary_only_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*--data"):
        TextData(str(tmp_path / "nope"), SEQ)
    with pytest.raises(DataError, match="matches no file"):
        TextData(str(tmp_path / "*.txt"), SEQ)
    write_file(tmp_path / "bin" / "a.dat", b"\0\1\2" * 50)
    with pytest.raises(DataError, match="no usable text.*1 binary"):
        TextData(str(tmp_path / "bin"), SEQ)
    write_file(tmp_path / "short.txt", b"tiny")
    with pytest.raises(DataError, match="shorter than 17 bytes"):
        TextData(str(tmp_path / "short.txt"), SEQ)
    assert issubclass(DataError, ValueError)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_raises(tmp_path: Path) -> None:
    f = write_file(tmp_path / "locked.txt", random_text(1000, 8))
    f.chmod(0)
    try:
        with pytest.raises(DataError, match="permission denied"):
            TextData(str(f), SEQ)
    finally:
        f.chmod(0o600)


def test_file_vanishing_mid_run_raises(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a.txt", random_text(4000, 9))
    write_file(tmp_path / "b.txt", random_text(4000, 10))
    data = TextData(str(tmp_path), SEQ)
    batches = data.train_batches(4)
    next(batches)
    a.unlink()
    with pytest.raises(DataError, match="disappeared"):
        for _ in range(10_000):
            next(batches)


def test_file_becoming_unreadable_mid_run_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated, because the suite may run as root, for whom chmod 0 changes nothing.
    write_file(tmp_path / "a.txt", random_text(4000, 18))
    data = TextData(str(tmp_path), SEQ)
    batches = data.train_batches(4)
    next(batches)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("node.training.data.open", denied, raising=False)
    with pytest.raises(DataError, match="became unreadable"):
        for _ in range(10_000):
            next(batches)


def test_split_is_disjoint_and_eval_is_deterministic(tmp_path: Path) -> None:
    write_file(tmp_path / "a.txt", random_text(30_000, 11))
    write_file(tmp_path / "b.txt", random_text(12_345, 12))
    data = TextData(str(tmp_path), SEQ, seed=3)
    train, held = data._block_indices(False), data._block_indices(True)
    assert data.has_eval and held and train
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(len(data._blocks)))
    # Per file: block j of a file is held out when (j + a phase from its relative name) % 20 == 19.
    for fi, name in enumerate(sorted(os.path.basename(f) for f in data.files)):
        phase = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 20
        own = [b for b in data._blocks if b.file == fi]
        assert [b.held_out for b in own] == [(j + phase) % 20 == 19 for j in range(len(own))]
    # Blocks tile every file exactly once.
    for fi, size in enumerate(os.path.getsize(f) for f in data.files):
        spans = sorted((b.offset, b.length) for b in data._blocks if b.file == fi)
        assert spans[0][0] == 0 and sum(n for _, n in spans) == size

    first, second = data.eval_batches(4, 3), data.eval_batches(4, 3)
    assert len(first) == 3
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    held_text, train_text = block_texts(data, True), block_texts(data, False)
    rows = [bytes(r) for b in first for r in b.tolist()]
    assert len(set(rows)) == len(rows)
    for row in rows:
        assert any(row in t for t in held_text) and not any(row in t for t in train_text)
    batches = data.train_batches(8)
    for _ in range(20):
        for row in next(batches).tolist():
            assert any(bytes(row) in t for t in train_text) and not any(bytes(row) in t for t in held_text)


def test_tiny_corpus_eval_fallbacks(tmp_path: Path) -> None:
    one = TextData(str(write_file(tmp_path / "one.txt", random_text(WIN, 13))), SEQ)
    assert not one.has_eval and one.eval_batches(4, 2) == []
    assert "no eval" in one.describe()
    check_batch(next(one.train_batches(3)), 3)
    two = TextData(str(write_file(tmp_path / "two.txt", random_text(2 * WIN + 5, 14))), SEQ)
    assert two._block_indices(True) == [len(two._blocks) - 1] == [1]
    assert [b.shape for b in two.eval_batches(4, 2)] == [(1, WIN)]


def test_train_stream_is_reproducible_per_seed(tmp_path: Path) -> None:
    f = str(write_file(tmp_path / "a.txt", random_text(20_000, 15)))
    a, b = TextData(f, SEQ, seed=1).train_batches(8), TextData(f, SEQ, seed=1).train_batches(8)
    c = TextData(f, SEQ, seed=2).train_batches(8)
    xs = [next(a) for _ in range(30)]
    assert all(torch.equal(x, next(b)) for x in xs)
    assert not all(torch.equal(x, next(c)) for x in xs)


def test_large_file_streams(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    line = random_text(1000, 16) + b"\n"
    with open(big, "wb") as fh:
        fh.writelines(line for _ in range(5000))
    data = TextData(str(big), 128)
    assert data.total_bytes == 5_005_000 and data.block_bytes == 64 * 1024
    batches = data.train_batches(16)
    for _ in range(3):
        assert next(batches).shape == (16, 129)
    assert [b.shape for b in data.eval_batches(16, 2)] == [(16, 129), (16, 129)]


def test_default_corpus() -> None:
    data = TextData(None, 64)
    assert len(data.files) > 20 and all(f.endswith(".py") for f in data.files)
    assert data.files == sorted(data.files)
    assert "python stdlib (default corpus)" in data.describe()
    assert data.has_eval
    batch = next(data.train_batches(4))
    assert batch.shape == (4, 65)


def test_bad_arguments(tmp_path: Path) -> None:
    data = TextData(str(write_file(tmp_path / "a.txt", random_text(2000, 17))), SEQ)
    with pytest.raises(ValueError):
        data.train_batches(0)
    with pytest.raises(ValueError):
        TextData(str(tmp_path), 0)


def test_training_stream_resumes_at_a_saved_position(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"".join(b"line %06d of the corpus\n" % i for i in range(20000)))
    data = TextData(str(path), 32, seed=3)
    stream = data.train_batches(4)
    for _ in range(1000):  # several read groups of 4 blocks
        next(stream)
    saved = data.position
    assert saved != (0, 0)
    resumed = TextData(str(path), 32, seed=3)
    batch = next(resumed.train_batches(4, start=saved))
    assert batch.shape == (4, 33) and resumed.position == saved
    beyond = TextData(str(path), 32, seed=3)
    next(beyond.train_batches(4, start=(saved[0], 10**9)))  # past the epoch's end: wraps
    assert beyond.position == (saved[0], 0)
