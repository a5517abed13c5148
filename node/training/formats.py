"""The file formats ``--data`` reads, each seen as one stream of text bytes.

- plain text: the file's bytes (``TextData`` reads these itself, with seeks)
- ``.gz`` / ``.xz`` / ``.bz2``: the decompressed bytes
- JSON Lines (``.jsonl``, ``.ndjson``, also compressed): each record's text field in UTF-8, records joined
  by ``SEPARATOR``; a line that is not JSON, or a record without a string field, is skipped and counted
- Parquet (``.parquet``): the text column's values, joined the same way, read batch by batch
- Arrow IPC (``.arrow``, stream or file format; Hugging Face ``datasets`` ``save_to_disk`` writes the
  stream format): the same, record batch by record batch

Nothing here holds a whole file: compressed text is read in 1 MiB pieces, records in groups of about
that size, Parquet and Arrow one record batch at a time (a Parquet reader also buffers its current row
group's column). A streamed source is read front to back only: ``scan`` counts its text bytes once and
finds what is wrong with it, and a ``Cursor`` serves reads at increasing offsets, reopening to go back.

Errors: content that cannot be read raises ``Unreadable`` (the reason is for a log line); an error of the
file system (missing file, permission denied) propagates as the ``OSError`` it is.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

SEPARATOR = b"\n\n"  # between the texts of two records
SNIFF_BYTES = 4096  # a NUL in a text stream's first 4 KiB means binary
# Hugging Face `datasets` metadata: never text. A directory with a state.json is a saved dataset and
# contributes exactly the arrow files that state.json lists.
METADATA_NAMES = ("state.json", "dataset_info.json", "dataset_dict.json")
_CHUNK_BYTES = 1 << 20
_RECORDS_PER_CHUNK = 4096
_COMPRESSIONS = {".gz": "gz", ".xz": "xz", ".bz2": "bz2"}
_JSONL = (".jsonl", ".ndjson")


class Unreadable(Exception):
    """A source's content cannot be used; the message says what is wrong, for one log line."""


@dataclass(frozen=True)
class Format:
    kind: str  # "text", "jsonl", "parquet" or "arrow"
    compression: Optional[str] = None  # "gz", "xz", "bz2"

    @property
    def label(self) -> str:
        return self.kind + (f".{self.compression}" if self.compression else "")

    @property
    def streamed(self) -> bool:
        """Read front to back through a decoder (everything but uncompressed plain text)."""
        return self != PLAIN


PLAIN = Format("text")


@dataclass
class Tally:
    """Records of a JSON Lines, Parquet or Arrow source: used, and skipped (malformed or without text)."""

    records: int = 0
    skipped: int = 0


def detect(path: str) -> Format:
    """The format of ``path``, by its name: everything not named otherwise is plain text."""
    stem, ext = os.path.splitext(os.path.basename(path).lower())
    compression = _COMPRESSIONS.get(ext)
    if compression is not None:
        return Format("jsonl" if os.path.splitext(stem)[1] in _JSONL else "text", compression)
    if ext in _JSONL:
        return Format("jsonl")
    if ext == ".parquet":
        return Format("parquet")
    if ext == ".arrow":
        return Format("arrow")
    return PLAIN


def select(candidates: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``candidates`` less Hugging Face metadata and the files a saved dataset does not list, and the
    (path, reason) of each state.json that cannot be read (its directory's ``*.arrow`` files are used)."""
    listings: dict[str, Optional[frozenset[str]]] = {}
    problems: list[tuple[str, str]] = []
    kept: list[str] = []
    for path in candidates:
        directory, name = os.path.split(path)
        if directory not in listings:
            listings[directory], problem = _dataset_listing(directory)
            if problem is not None:
                problems.append((os.path.join(directory, "state.json"), problem))
        listed = listings[directory]
        if name in METADATA_NAMES:
            continue
        if listed is None or name in listed or ("*" in listed and name.endswith(".arrow")):
            kept.append(path)
    return kept, problems


def _dataset_listing(directory: str) -> tuple[Optional[frozenset[str]], Optional[str]]:
    """(names of the data files a `save_to_disk` directory lists, or None if it is not one; a problem)."""
    state = os.path.join(directory or ".", "state.json")
    if not os.path.isfile(state):
        return None, None
    try:
        with open(state, "rb") as fh:
            files = json.load(fh)["_data_files"]
        return frozenset(str(entry["filename"]) for entry in files), None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return frozenset({"*"}), f"not a readable Hugging Face dataset state ({type(err).__name__}: {err})"


# -- text streams ----------------------------------------------------------------------


def text_chunks(path: str, fmt: Format, field: str, tally: Tally) -> Iterator[bytes]:
    """The text of ``path`` in pieces (of about 1 MiB), first to last; ``tally`` counts its records."""
    if fmt.kind == "parquet":
        return _joined(_parquet_texts(path, field, tally))
    if fmt.kind == "arrow":
        return _joined(_arrow_texts(path, field, tally))
    if fmt.kind == "jsonl":
        return _joined(_jsonl_texts(path, fmt.compression, field, tally))
    return _raw(path, fmt.compression)


def _open_binary(path: str, compression: Optional[str]) -> io.BufferedIOBase:
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def _raw(path: str, compression: Optional[str]) -> Iterator[bytes]:
    with _open_binary(path, compression) as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            yield chunk


def _joined(groups: Iterator[list[str]]) -> Iterator[bytes]:
    """Texts joined by SEPARATOR (empty texts add nothing), one piece per group."""
    first = True
    for texts in groups:
        parts = [t.encode("utf-8", "replace") for t in texts if t]
        if parts:
            piece = SEPARATOR.join(parts)
            yield piece if first else SEPARATOR + piece
            first = False


def _jsonl_texts(path: str, compression: Optional[str], field: str, tally: Tally) -> Iterator[list[str]]:
    group: list[str] = []
    size = 0
    with _open_binary(path, compression) as fh:
        for line in fh:  # one record at a time: memory is one line, however long the file
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
                tally.skipped += 1
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                tally.skipped += 1
                continue
            tally.records += 1
            group.append(text)
            size += len(text)
            if size >= _CHUNK_BYTES or len(group) >= _RECORDS_PER_CHUNK:
                yield group
                group, size = [], 0
    if group:
        yield group
    if tally.records == 0 and tally.skipped:
        raise Unreadable(f"none of its {tally.skipped} line(s) is a JSON record with a string field {field!r}")


def _column_texts(column: Any, tally: Tally) -> list[str]:
    values = column.to_pylist()
    texts = [v for v in values if isinstance(v, str)]
    tally.records += len(texts)
    tally.skipped += len(values) - len(texts)  # nulls
    return texts


def _text_column(schema: Any, field: str, what: str) -> None:
    """Unreadable unless ``schema`` has a string column ``field``."""
    import pyarrow as pa

    index = schema.get_field_index(field)
    if index < 0:
        raise Unreadable(f"{what} has no column {field!r} (pass --data-field with one of {schema.names})")
    kind = schema.field(index).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise Unreadable(f"{what} column {field!r} holds {kind}, not text")


def _parquet_texts(path: str, field: str, tally: Tally) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    with open(path, "rb") as fh:
        # pre_buffer (pyarrow's default) reads ahead across row groups: a 134 MB file then peaked at +223 MB
        # of memory; one row group at a time without it stays at about +65 MB, whatever the file's size.
        parquet = pq.ParquetFile(fh, pre_buffer=False)
        _text_column(parquet.schema_arrow, field, "the Parquet file")
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(
                batch_size=_RECORDS_PER_CHUNK, row_groups=[group], columns=[field], use_threads=False
            ):
                yield _column_texts(batch.column(0), tally)


def _arrow_texts(path: str, field: str, tally: Tally) -> Iterator[list[str]]:
    import pyarrow as pa

    with open(path, "rb") as fh:
        random_access = fh.read(6) == b"ARROW1"  # the IPC file format's magic; the stream format has none
        fh.seek(0)
        if random_access:
            reader = pa.ipc.open_file(fh)
            batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(fh)
            batches = iter(reader)
        _text_column(reader.schema, field, "the Arrow file")
        for batch in batches:
            yield _column_texts(batch.column(batch.schema.get_field_index(field)), tally)


def content_problem(err: BaseException) -> Optional[str]:
    """Why ``err`` means a source's content is unusable, or None when it is not about content (a file
    system error such as permission denied, which has an errno, or a bug)."""
    if isinstance(err, Unreadable):
        return str(err)
    if type(err).__module__.startswith("pyarrow"):
        return f"not readable by pyarrow ({err})"
    if isinstance(err, (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)):
        return f"corrupt or truncated compressed data ({type(err).__name__}: {err})"
    if isinstance(err, OSError) and err.errno is None:  # bz2's "Invalid data stream" and the like
        return f"corrupt compressed data ({err})"
    return None


@dataclass(frozen=True)
class Scan:
    text_bytes: int
    tally: Tally
    binary: bool  # decompressed text with a NUL in its first 4 KiB (an archive, say): not text


def scan(path: str, fmt: Format, field: str) -> Scan:
    """Read ``path``'s text stream once: its length and records, or Unreadable (OSError: file system)."""
    tally, total = Tally(), 0
    try:
        for chunk in text_chunks(path, fmt, field, tally):
            if total < SNIFF_BYTES and fmt.kind == "text" and b"\0" in chunk[: SNIFF_BYTES - total]:
                return Scan(total, tally, binary=True)
            total += len(chunk)
    except Exception as err:
        problem = content_problem(err)
        if problem is None:
            raise
        raise Unreadable(problem) from err
    return Scan(total, tally, binary=False)


# -- reading at offsets ----------------------------------------------------------------


class Cursor:
    """Reads one streamed source's text at increasing offsets; an earlier offset reopens the stream."""

    def __init__(self, path: str, fmt: Format, field: str) -> None:
        self._args = (path, fmt, field)
        self._open()

    def _open(self) -> None:
        self._chunks = text_chunks(*self._args, Tally())
        self._buffer = b""  # the current piece of the stream
        self._start = 0  # its offset in the text stream

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer if the stream ends first)."""
        if offset < self._start:
            self.close()
            self._open()
        out = bytearray()
        while len(out) < length:
            end = self._start + len(self._buffer)
            if offset < end:
                piece = self._buffer[offset - self._start : offset - self._start + length - len(out)]
                out += piece
                offset += len(piece)
                continue
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            self._start, self._buffer = end, nxt
        return bytes(out)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # a generator's close runs its `with` exits: the file is closed now, not at collection


class Cursors:
    """At most ``capacity`` open cursors, by source index; the least recently used is closed first.
    Each open cursor holds a file and a decoder (an xz decoder of a default preset: about 9 MiB)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._open: OrderedDict[int, Cursor] = OrderedDict()

    def read(self, key: int, path: str, fmt: Format, field: str, offset: int, length: int) -> bytes:
        cursor = self._open.pop(key, None)
        if cursor is None:
            cursor = Cursor(path, fmt, field)
        try:
            data = cursor.read(offset, length)
        except Exception as err:
            cursor.close()  # a failed stream cannot go on: the next read reopens it
            problem = content_problem(err)
            if problem is None:
                raise
            raise Unreadable(problem) from err
        self._open[key] = cursor
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return data

    def close(self, key: int) -> None:
        cursor = self._open.pop(key, None)
        if cursor is not None:
            cursor.close()

    def close_all(self) -> None:
        while self._open:
            self._open.popitem(last=False)[1].close()
