"""Unit tests for the data formats --data reads: compressed text, JSON Lines, Parquet, Arrow, Hugging Face datasets."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from node.training import formats
from node.training.data import DataError, TextData
from tests.unit.textfiles import SEQ, block_texts, check_batch, random_text, write_file

SEP = b"\n\n"  # between two records' texts


def _records(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng.randint(40, 400), seed * 1000 + i).decode() for i in range(n)]


def _joined(texts: list[str]) -> bytes:
    return SEP.join(t.encode() for t in texts if t)


def _write_compressed(path: Path, data: bytes) -> Path:
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as fh:
        fh.write(data)
    return path


def _write_jsonl(path: Path, lines: list[object], compress: bool = False) -> Path:
    body = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    return _write_compressed(path, body) if compress else write_file(path, body)


def _write_parquet(path: Path, columns: dict[str, list[object]], row_group_size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _save_dataset(path: Path, texts: list[str], **kwargs: int) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(path), **kwargs)
    return path


def _stream(data: TextData, path: str) -> bytes:
    """A file's whole text stream, read back block by block (forward, as training reads it)."""
    fi = data.files.index(path)
    return b"".join(data._read_block(k) for k, b in enumerate(data._blocks) if b.file == fi)


def _rows(batches: list[torch.Tensor]) -> list[bytes]:
    return [bytes(row) for batch in batches for row in batch.tolist()]


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2"])
def test_compressed_text_is_read_as_a_stream(tmp_path: Path, suffix: str) -> None:
    text = random_text(30_000, 20)
    f = str(_write_compressed(tmp_path / f"corpus.txt{suffix}", text))
    data = TextData(f, SEQ, seed=1)
    assert data.files == [f] and data.total_bytes == len(text)
    assert f"1 text{suffix}" in data.describe()
    assert _stream(data, f) == text
    for row in _rows([next(data.train_batches(8)) for _ in range(5)] + data.eval_batches(4, 2)):
        assert row in text


def test_compressed_stream_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    text = random_text(100_000, 21) * 30  # 3 MB of text
    f = str(_write_compressed(tmp_path / "big.gz", text))
    pieces = list(formats.text_chunks(f, formats.detect(f), "text", formats.Tally()))
    assert b"".join(pieces) == text and len(pieces) >= 3 and max(map(len, pieces)) <= 1 << 20


def test_compressed_binary_is_skipped(tmp_path: Path) -> None:
    _write_compressed(tmp_path / "archive.tar.gz", b"\0\1\2" * 2000)
    keep = write_file(tmp_path / "a.txt", random_text(2000, 22))
    data = TextData(str(tmp_path), SEQ)
    assert data.files == [str(keep)] and "1 skipped: binary" in data.describe()


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.ndjson", "docs.jsonl.gz", "docs.jsonl.xz", "docs.ndjson.bz2"])
def test_jsonl_records_text_joined_and_bad_lines_counted(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    texts = _records(60, 23)
    lines: list[object] = [{"body": t, "id": i} for i, t in enumerate(texts)]
    bad: list[object] = ["{not json", {"body": 7}, {"other": "x"}, ["a", "list"], '"a string"', "\xff"]
    lines[5:5] = bad
    lines.insert(20, "")  # a blank line is not a record
    path = tmp_path / name
    f = str(_write_jsonl(path, lines, compress=path.suffix in (".gz", ".xz", ".bz2")))
    with caplog.at_level(logging.WARNING, logger="node.training.data"):
        data = TextData(f, SEQ, field="body")
    assert data.total_bytes == len(_joined(texts)) and _stream(data, f) == _joined(texts)
    assert [r.getMessage() for r in caplog.records] == [
        f"data: {f}: skipped {len(bad)} of {len(texts) + len(bad)} records (not JSON, or no string field 'body')"
    ]
    assert f"{len(bad)} records without text skipped" in data.describe()
    for row in _rows([next(data.train_batches(4))] + data.eval_batches(4, 1)):
        assert row in _joined(texts)


def test_jsonl_without_the_field_is_named_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _write_jsonl(tmp_path / "a.jsonl", [{"content": t} for t in _records(30, 24)])
    good = _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in _records(30, 25)])
    with caplog.at_level(logging.WARNING, logger="node.training.data"):
        data = TextData(str(tmp_path), SEQ)
    assert data.files == [str(good)]
    (message,) = [r.getMessage() for r in caplog.records]
    assert str(bad) in message and "'text'" in message
    assert "1 unreadable, named in the log" in data.describe()


def test_parquet_column_streamed_by_batch(tmp_path: Path) -> None:
    texts = _records(100, 26)
    column: list[object] = list(texts)
    column[3] = None  # a null is a record without text
    f = str(_write_parquet(tmp_path / "t.parquet", {"text": column, "n": list(range(100))}))
    assert pq.ParquetFile(f).num_row_groups > 1
    data = TextData(f, SEQ, seed=2)
    expected = _joined([t for i, t in enumerate(texts) if i != 3])
    assert data.total_bytes == len(expected) and _stream(data, f) == expected
    assert "1 parquet" in data.describe() and "1 records without text skipped" in data.describe()
    for row in _rows([next(data.train_batches(8)) for _ in range(3)] + data.eval_batches(4, 2)):
        assert row in expected


def test_parquet_without_the_column_is_named_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    no_column = _write_parquet(tmp_path / "a.parquet", {"content": _records(20, 27)})
    not_text = _write_parquet(tmp_path / "b.parquet", {"text": list(range(20))})
    good = _write_parquet(tmp_path / "c.parquet", {"text": _records(20, 28)})
    with caplog.at_level(logging.WARNING, logger="node.training.data"):
        data = TextData(str(tmp_path), SEQ)
    assert data.files == [str(good)]
    first, second = [r.getMessage() for r in caplog.records]
    assert str(no_column) in first and "no column 'text'" in first and "content" in first
    assert str(not_text) in second and "not text" in second


def test_arrow_ipc_file_and_stream_formats(tmp_path: Path) -> None:
    texts = _records(50, 29)
    table = pa.table({"text": texts})
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    data = TextData(str(tmp_path), SEQ)
    assert data.describe().startswith("2 file(s) [2 arrow]")
    for f in data.files:
        assert _stream(data, f) == _joined(texts)


def test_hugging_face_dataset_directory(tmp_path: Path) -> None:
    texts = _records(80, 30)
    ds = _save_dataset(tmp_path / "outer" / "ds", texts, num_shards=2)
    shards = sorted(str(p) for p in ds.glob("*.arrow"))
    assert len(shards) == 2 and (ds / "state.json").exists() and (ds / "dataset_info.json").exists()
    for spec in (ds, tmp_path / "outer"):  # the dataset itself, or a directory containing it
        data = TextData(str(spec), SEQ)
        assert data.files == shards and "[2 arrow]" in data.describe()
        assert SEP.join(_stream(data, f) for f in shards) == _joined(texts)


def test_hugging_face_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    train, test = _records(40, 31), _records(20, 32)
    splits = {"train": datasets.Dataset.from_dict({"text": train}), "test": datasets.Dataset.from_dict({"text": test})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert (tmp_path / "dd" / "dataset_dict.json").exists()
    data = TextData(str(tmp_path / "dd"), SEQ)
    assert [Path(f).parent.name for f in data.files] == ["test", "train"]
    assert [_stream(data, f) for f in data.files] == [_joined(test), _joined(train)]
    assert not any(f.endswith(".json") for f in data.files)


def _mixed(root: Path) -> dict[str, bytes]:
    """A directory with every format; {path: its expected text stream}."""
    recs = _records(120, 40)
    return {
        str(write_file(root / "plain.txt", random_text(9000, 41))): random_text(9000, 41),
        str(_write_compressed(root / "gz" / "a.txt.gz", random_text(9000, 42))): random_text(9000, 42),
        str(_write_compressed(root / "b.xz", random_text(7000, 43))): random_text(7000, 43),
        str(_write_compressed(root / "c.bz2", random_text(5000, 44))): random_text(5000, 44),
        str(_write_jsonl(root / "d.jsonl", [{"text": t} for t in recs[:40]])): _joined(recs[:40]),
        str(_write_jsonl(root / "e.jsonl.gz", [{"text": t} for t in recs[40:80]], compress=True)): _joined(recs[40:80]),
        str(_write_parquet(root / "f.parquet", {"text": recs[80:]})): _joined(recs[80:]),
        str(_save_dataset(root / "hf", recs[:30]) / "data-00000-of-00001.arrow"): _joined(recs[:30]),
    }


def test_mixed_directory_split_and_batches(tmp_path: Path) -> None:
    expected = _mixed(tmp_path)
    data = TextData(str(tmp_path), SEQ, seed=5)
    assert data.files == sorted(expected)
    assert data.total_bytes == sum(map(len, expected.values()))
    assert data.describe().startswith(
        "8 file(s) [1 arrow, 1 jsonl, 1 jsonl.gz, 1 parquet, 1 text, 1 text.bz2, 1 text.gz, 1 text.xz]"
    )
    for f in data.files:
        assert _stream(data, f) == expected[f]
    # The held-out split is a function of the files alone: the same for another seed, on another run.
    again = TextData(str(tmp_path), SEQ, seed=9)
    assert again._blocks == data._blocks and data.has_eval
    first, second = data.eval_batches(8, 3), again.eval_batches(8, 3)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    held_text, train_text = block_texts(data, True), block_texts(data, False)
    for row in _rows(first):
        assert any(row in t for t in held_text) and not any(row in t for t in train_text)
    batches = data.train_batches(8)
    for row in _rows([next(batches) for _ in range(40)]):
        assert any(row in t for t in train_text) and not any(row in t for t in held_text)


def test_streamed_files_are_read_front_to_back_once_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(12):  # more files than are kept open at once
        _write_compressed(tmp_path / f"{i:02}.gz", random_text(6000, 50 + i))
    write_file(tmp_path / "plain.txt", random_text(20_000, 49))
    data = TextData(str(tmp_path), SEQ, seed=6)
    streamed = [b.file for b in data._blocks if data.files[b.file].endswith(".gz")]
    assert len(set(streamed)) == 12
    opened: list[tuple[int, str]] = []  # (epoch, file) of each time a stream was opened
    real_open = formats.Cursor._open

    def counting(cursor: formats.Cursor) -> None:
        opened.append((data.position[0], cursor._args[0]))
        real_open(cursor)

    monkeypatch.setattr(formats.Cursor, "_open", counting)
    for epoch in range(2):
        order = [int(k) for k in data._epoch_order(np.random.default_rng([6, epoch]), epoch)]
        assert sorted(order) == data._block_indices(False)
        for fi in set(streamed):
            mine = [k for k in order if data._blocks[k].file == fi]
            assert mine == sorted(mine)  # each streamed file front to back
    stream = data.train_batches(4)
    while data.position[0] == 0:  # one whole epoch
        next(stream)
    first_epoch = sorted(path for epoch, path in opened if epoch == 0)
    assert first_epoch == sorted({data.files[fi] for fi in streamed})  # each opened once, never reopened


def test_streamed_training_resumes_at_a_saved_position(tmp_path: Path) -> None:
    f = str(_write_compressed(tmp_path / "a.txt.xz", b"".join(b"line %06d of the corpus\n" % i for i in range(20000))))
    data = TextData(f, 32, seed=3)
    stream = data.train_batches(4)
    for _ in range(1000):  # several read groups of 4 blocks
        next(stream)
    saved = data.position
    assert saved != (0, 0)
    resumed = TextData(f, 32, seed=3)
    batch = next(resumed.train_batches(4, start=saved))
    assert batch.shape == (4, 33) and resumed.position == saved


def test_corrupt_compressed_files_are_named_once_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = gzip.compress(random_text(50_000, 60))
    truncated = write_file(tmp_path / "truncated.txt.gz", whole[: len(whole) // 2])
    garbage = write_file(tmp_path / "garbage.gz", random_text(5000, 61))
    bad_xz = write_file(tmp_path / "bad.xz", random_text(5000, 62))
    bad_bz2 = write_file(tmp_path / "bad.bz2", b"BZh9" + random_text(5000, 63))
    bad_jsonl = write_file(tmp_path / "bad.jsonl.gz", b"\x1f\x8b" + random_text(3000, 64))
    bad_parquet = write_file(tmp_path / "bad.parquet", random_text(3000, 65))
    bad_arrow = write_file(tmp_path / "bad.arrow", random_text(3000, 66))
    good = _write_compressed(tmp_path / "good.gz", random_text(5000, 67))
    with caplog.at_level(logging.WARNING, logger="node.training.data"):
        data = TextData(str(tmp_path), SEQ)
    assert data.files == [str(good)] and data.total_bytes == 5000
    messages = [r.getMessage() for r in caplog.records]
    broken = [truncated, garbage, bad_xz, bad_bz2, bad_jsonl, bad_parquet, bad_arrow]
    assert len(messages) == len(broken)
    for path in broken:
        assert sum(str(path) in m for m in messages) == 1
    assert "7 unreadable, named in the log" in data.describe()
    check_batch(next(data.train_batches(4)), 4)
    with pytest.raises(DataError, match="no usable text.*1 unreadable"):
        TextData(str(truncated), SEQ)


def test_streamed_file_vanishing_or_changing_mid_run_raises(tmp_path: Path) -> None:
    a = _write_compressed(tmp_path / "a.gz", random_text(100_000, 70) * 25)  # 2.5 MB: more than one piece of the stream
    data = TextData(str(a), SEQ)
    data._read_block(len(data._blocks) - 1)
    a.write_bytes(b"garbage, no longer gzip" * 100)
    with pytest.raises(DataError, match=f"data file {a} changed since it was scanned"):
        data._read_block(0)  # an earlier offset: the stream is opened again
    a.unlink()
    with pytest.raises(DataError, match="disappeared"):
        data._read_block(0)


def test_commitment_is_stable_size_sensitive_and_names_nothing(tmp_path: Path) -> None:
    expected = _mixed(tmp_path / "secret-corpus-name")
    root = tmp_path / "secret-corpus-name"
    one = TextData(str(root), SEQ).commitment()
    assert one == TextData(str(root), SEQ, seed=7).commitment()
    assert one["files"] == len(expected) and one["bytes"] == sum(map(len, expected.values()))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", one["commitment"])
    shown = json.dumps(one)
    for name in ["secret", "plain", "parquet", "jsonl", ".gz", "hf", "data-0000"]:
        assert name not in shown
    # Relative to the --data root: the same files elsewhere commit the same.
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert TextData(str(moved), SEQ).commitment() == one
    with open(moved / "plain.txt", "ab") as fh:
        fh.write(b"one more line\n")
    changed = TextData(str(moved), SEQ).commitment()
    assert changed["commitment"] != one["commitment"] and changed["bytes"] == one["bytes"] + 14


def test_streamed_eval_windows_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = random_text(40_000, 80)
    f = str(_write_compressed(tmp_path / "a.xz", text))
    data = TextData(f, SEQ)
    first = data.eval_batches(4, 3)
    opened: list[object] = []
    monkeypatch.setattr(formats.Cursor, "_open", lambda cursor: opened.append(cursor))
    again, fewer = data.eval_batches(4, 3), data.eval_batches(4, 1)  # every window list is a prefix of one
    assert opened == []
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True)) and torch.equal(fewer[0], first[0])
    assert all(row in text for row in _rows(first))
