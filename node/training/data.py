"""Training text streamed from the user's own files.

The corpus is never loaded whole. Plain text files are only stat'ed (and their first 4 KiB sniffed to
reject binaries) and read later with seeks. Every other format (compressed text, JSON Lines, Parquet,
Arrow, Hugging Face ``save_to_disk`` directories; node/training/formats.py) is seen as the stream of its
text and scanned once at construction, as a stream, to count its text bytes: that also names, in one
warning each, the files that cannot be read, which are skipped. Batches are cut from a few blocks read
at a time.

The held-out split, per file. Each file's text stream (a plain file's bytes; the decompressed bytes;
records' text fields joined by a blank line) is cut into blocks of ``block_bytes`` (one size for the
whole corpus, set by its total text bytes), the file's tail joined to its last block. Block j of a file
is held out when (j + phase) % EVAL_EVERY == EVAL_EVERY - 1, the file's phase a hash of its path
relative to the --data root: a long file gives one block in EVAL_EVERY, and one small file in EVAL_EVERY
is held out whole. A corpus whose rule holds out nothing, or everything, holds out its last block if it
has 2 or more. The split depends on nothing but the files' names and texts, so it is the same on every
run and on every node with the same files.

The training order. Each epoch permutes the training blocks (from the seed and the epoch). A streamed
file cannot seek, so the positions the permutation gave streamed blocks are refilled to read each
streamed file front to back once per epoch, at most _LANES files at a time, taking turns at random;
plain files keep full random access. Held-out windows of streamed files are read in file/offset order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from node.errors import DataPathError
from node.training.formats import PLAIN, SNIFF_BYTES, Cursors, Format, Unreadable, detect, scan, select

logger = logging.getLogger(__name__)

MAX_BLOCK_BYTES = 64 * 1024
EVAL_EVERY = 20  # one block in EVAL_EVERY of each file is held out (TextData._phase)
_BLOCKS_PER_READ = 4
_GLOB_CHARS = ("*", "?", "[")
# Streamed files open at once in training: each holds a decoder (up to ~9 MiB for xz) and a 1 MiB piece.
_LANES = 8


class DataError(DataPathError):
    """The training data cannot be used; the message says what to change."""


class DataCommitment(TypedDict):
    commitment: str  # "sha256:<64 hex digits>"
    files: int  # files used
    bytes: int  # their text bytes (decompressed, records' text)


@dataclass(frozen=True)
class _Block:
    file: int  # index into TextData.files
    offset: int  # in the file's text stream
    length: int
    held_out: bool


@dataclass(frozen=True)
class _Source:
    path: str
    format: Format
    text_bytes: int
    disk_bytes: int


@dataclass
class _Skipped:
    binary: int = 0
    empty: int = 0
    too_short: int = 0
    unreadable: int = 0
    records: int = 0  # JSON Lines / Parquet / Arrow records without a string text field

    @property
    def files(self) -> int:
        return self.binary + self.empty + self.too_short + self.unreadable


def _looks_binary(path: str) -> bool:
    with open(path, "rb") as fh:
        return b"\0" in fh.read(SNIFF_BYTES)


def _walk(root: str) -> list[str]:
    def fail(err: OSError) -> None:
        raise DataError(
            f"cannot read directory {err.filename}: {err.strerror}; fix its permissions or pass another --data"
        )

    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return found


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """File system errors while training, as DataErrors that say what to do."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"data file {path} disappeared while training; restore it or restart the node") from None
    except PermissionError:
        raise DataError(
            f"data file {path} became unreadable (permission denied); fix its permissions or restart the node"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror}; fix it or restart the node") from None
    except Unreadable as err:
        raise DataError(f"data file {path} changed since it was scanned ({err}); restart the node") from None


class TextData:
    """Byte windows of ``seq_len + 1`` from a file, a directory, a glob, or the default corpus.

    ``field`` names the text field of JSON Lines records and the text column of Parquet and Arrow data.
    """

    def __init__(self, spec: str | None, seq_len: int, *, seed: int = 0, field: str = "text") -> None:
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        if not field:
            raise ValueError("field must name the text field of records, e.g. 'text'")
        self.seq_len = seq_len
        self.seed = seed
        self.field = field
        self.position: tuple[int, int] = (0, 0)  # (epoch, read group) the training stream is in
        self._window = seq_len + 1
        if spec is None:
            self.source = "python stdlib (default corpus)"
            self._root = _stdlib_dir()
            candidates = glob.glob(os.path.join(glob.escape(self._root), "*.py"))
        else:
            self.source = spec
            self._root = self._root_of(spec)
            candidates, problems = select(self._resolve(spec))
            for path, problem in problems:
                logger.warning("data: %s: %s; using the directory's *.arrow files", path, problem)
        self._skipped = _Skipped()
        self._sources = self._filter(sorted(candidates), spec)
        total = self.total_bytes
        # Small corpora get smaller blocks so that roughly 40 exist and some are held out.
        self.block_bytes = max(self._window, min(MAX_BLOCK_BYTES, total // 40))
        self._blocks = self._cut_blocks()
        self._streamed_train = self._streamed_train_blocks()
        self._last_train = {blocks[-1] for blocks in self._streamed_train.values()}
        self._is_streamed = np.array([self._sources[b.file].format.streamed for b in self._blocks], dtype=bool)
        self._train_cursors = Cursors(_LANES)
        self._eval_cursors = Cursors(1)
        self._eval_cache: dict[tuple[int, int], bytes] = {}  # held-out windows of streamed files
        self._commitment: DataCommitment | None = None

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def _resolve(spec: str) -> list[str]:
        if any(c in spec for c in _GLOB_CHARS) and not os.path.exists(spec):
            matches = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise DataError(
                    f"data glob {spec!r} matches no file; check the pattern (quote it so the shell does not expand it)"
                )
            return matches
        if not os.path.exists(spec):
            raise DataError(f"data path {spec} does not exist; pass --data with a text file, a directory or a glob")
        if os.path.isdir(spec):
            return _walk(spec)
        return [spec]

    @staticmethod
    def _root_of(spec: str) -> str:
        """The directory the commitment names files relative to: the directory given, a file's
        directory, or a glob's directory before its first wildcard."""
        if os.path.isdir(spec):
            return spec
        if any(c in spec for c in _GLOB_CHARS) and not os.path.exists(spec):
            spec = spec[: min(spec.index(c) for c in _GLOB_CHARS if c in spec)]
        return os.path.dirname(spec) or "."

    def _filter(self, candidates: Sequence[str], spec: str | None) -> list[_Source]:
        sources: list[_Source] = []
        skipped = self._skipped
        started, scanned = time.perf_counter(), 0
        for path in candidates:
            fmt = detect(path) if spec is not None else PLAIN
            try:
                disk = os.stat(path).st_size
                if disk == 0:
                    skipped.empty += 1
                    continue
                if fmt.streamed:
                    result = scan(path, fmt, self.field)
                    binary, text = result.binary, result.text_bytes
                    scanned += text
                    if result.tally.skipped:
                        skipped.records += result.tally.skipped
                        logger.warning(
                            "data: %s: skipped %d of %d records (not JSON, or no string field %r)",
                            path, result.tally.skipped, result.tally.skipped + result.tally.records, self.field,
                        )
                else:
                    binary, text = _looks_binary(path), disk
            except Unreadable as err:
                logger.warning("data: skipping %s: %s", path, err)
                skipped.unreadable += 1
                continue
            except PermissionError:
                raise DataError(
                    f"cannot read data file {path}: permission denied; fix its permissions or exclude it from --data"
                ) from None
            except OSError as err:
                raise DataError(
                    f"cannot read data file {path}: {err.strerror}; fix it or exclude it from --data"
                ) from None
            if binary:
                skipped.binary += 1
            elif text == 0:
                skipped.empty += 1
            elif text < self._window:  # a text shorter than one window cannot yield a single example
                skipped.too_short += 1
            else:
                sources.append(_Source(path, fmt, text, disk))
        if scanned:
            seconds = time.perf_counter() - started
            logger.info("data: scanned %.1f MB of compressed or structured text in %.1f s", scanned / 1e6, seconds)
        if not sources:
            where = "the python standard library" if spec is None else spec
            raise DataError(
                f"no usable text in {where}: {len(candidates)} file(s) found, {skipped.binary} binary, "
                f"{skipped.empty} empty, {skipped.unreadable} unreadable (named in the log), {skipped.too_short} "
                f"shorter than {self._window} bytes; pass --data with text files of at least that size"
            )
        return sources

    def _cut_blocks(self) -> list[_Block]:
        spans: list[tuple[int, int, int]] = []
        b = self.block_bytes
        held: set[int] = set()
        for fi, source in enumerate(self._sources):
            size = source.text_bytes
            n = max(1, size // b)
            phase = self._phase(fi)
            for j in range(n):
                # The file's tail joins its last block, so no block is shorter than a window.
                length = b if j < n - 1 else size - j * b
                if (j + phase) % EVAL_EVERY == EVAL_EVERY - 1:
                    held.add(len(spans))
                spans.append((fi, j * b, length))
        if len(held) == len(spans):  # a file or two, each held out whole: something must be left to train on
            held = set()
        if not held and len(spans) >= 2:
            held = {len(spans) - 1}
        return [_Block(fi, off, ln, k in held) for k, (fi, off, ln) in enumerate(spans)]

    def _phase(self, file: int) -> int:
        """Block j of a file is held out when (j + its phase) % EVAL_EVERY == EVAL_EVERY - 1, the phase a hash
        of its relative name: one block in EVAL_EVERY of every file, and one small file in EVAL_EVERY held out
        whole, whatever other files the corpus holds."""
        digest = hashlib.sha256(self._relative_name(file).encode()).digest()
        return int.from_bytes(digest[:4], "little") % EVAL_EVERY

    def _relative_name(self, file: int) -> str:
        """The file's path relative to the --data root, with "/" separators (what the split and the
        commitment depend on, so that moving the directory changes neither)."""
        return os.path.relpath(self._sources[file].path, self._root).replace(os.sep, "/")

    def _streamed_train_blocks(self) -> dict[int, list[int]]:
        """{streamed file: its training blocks, in file order}."""
        out: dict[int, list[int]] = {}
        for k, b in enumerate(self._blocks):
            if not b.held_out and self._sources[b.file].format.streamed:
                out.setdefault(b.file, []).append(k)
        return out

    # -- properties --------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        return [s.path for s in self._sources]

    @property
    def total_bytes(self) -> int:
        """Bytes of text (a compressed file counts its decompressed text)."""
        return sum(s.text_bytes for s in self._sources)

    @property
    def has_eval(self) -> bool:
        return any(b.held_out for b in self._blocks)

    def _block_indices(self, held_out: bool) -> list[int]:
        return [k for k, b in enumerate(self._blocks) if b.held_out == held_out]

    def describe(self) -> str:
        n_eval = len(self._block_indices(True))
        n_train = len(self._blocks) - n_eval
        formats = Counter(s.format.label for s in self._sources)
        kinds = ", ".join(f"{n} {label}" for label, n in sorted(formats.items()))
        s = self._skipped
        notes = []
        if s.binary + s.empty + s.too_short:
            notes.append(f"{s.binary + s.empty + s.too_short} skipped: binary, empty or too short")
        if s.unreadable:
            notes.append(f"{s.unreadable} unreadable, named in the log")
        skipped = f" ({'; '.join(notes)})" if notes else ""
        records = f", {s.records:,} records without text skipped" if s.records else ""
        eval_note = "" if n_eval else " (corpus too small for a held-out split: no eval)"
        return (
            f"{len(self._sources)} file(s) [{kinds}]{skipped}, {self.total_bytes:,} bytes{records}, "
            f"{n_train} train / {n_eval} eval blocks of {self.block_bytes:,} bytes{eval_note}; source: {self.source}"
        )

    def commitment(self) -> DataCommitment:
        """What this node trains on, revealing no name or content: a SHA-256 over the sorted
        (path relative to the --data root, size on disk in bytes) pairs of the files used, as compact
        JSON ``[["a/b.txt",123],...]``. Unsalted: whoever knows the exact files can confirm them."""
        if self._commitment is None:
            pairs = sorted([self._relative_name(fi), s.disk_bytes] for fi, s in enumerate(self._sources))
            digest = hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()
            self._commitment = DataCommitment(
                commitment=f"sha256:{digest}", files=len(self._sources), bytes=self.total_bytes
            )
        return DataCommitment(**self._commitment)  # a copy: the caller may change it

    # -- reading -----------------------------------------------------------------------

    def _read(self, path: str, offset: int, length: int) -> bytes:
        with _reading(path):
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        return self._whole(path, data, length)

    @staticmethod
    def _whole(path: str, data: bytes, length: int) -> bytes:
        if len(data) < length:
            raise DataError(f"data file {path} shrank while training; restart the node so the corpus is re-scanned")
        return data

    def _read_text(self, fi: int, offset: int, length: int, cursors: Cursors) -> bytes:
        """``length`` bytes at ``offset`` of file ``fi``'s text: a seek, or a streamed file's cursor."""
        source = self._sources[fi]
        if not source.format.streamed:
            return self._read(source.path, offset, length)
        with _reading(source.path):
            data = cursors.read(fi, source.path, source.format, self.field, offset, length)
        return self._whole(source.path, data, length)

    def _read_block(self, k: int) -> bytes:
        b = self._blocks[k]
        return self._read_text(b.file, b.offset, b.length, self._train_cursors)

    @staticmethod
    def _to_batch(windows: Sequence[bytes]) -> torch.Tensor:
        arr = np.stack([np.frombuffer(w, dtype=np.uint8) for w in windows])
        return torch.from_numpy(arr.astype(np.int64))

    def train_batches(self, batch_size: int, start: tuple[int, int] = (0, 0)) -> Iterator[torch.Tensor]:
        """Endless (batch_size, seq_len + 1) int64 batches from the training blocks.

        ``start`` is a ``position`` saved earlier (epoch, read group): the stream resumes
        there, in the same block order, so a restarted node does not start its data over.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        return self._train_iter(batch_size, start)

    def _epoch_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        """The training blocks in the order epoch ``epoch`` reads them (see the module docstring)."""
        train = np.array(self._block_indices(False))
        order = train[rng.permutation(len(train))]
        if not self._streamed_train:
            return order
        positions = np.flatnonzero(self._is_streamed[order])
        lane_rng = np.random.default_rng([self.seed % 2**63, epoch, 1])  # its own, so plain-only orders stay put
        files = [self._streamed_train[f] for f in sorted(self._streamed_train)]
        queue = deque(files[i] for i in lane_rng.permutation(len(files)))
        lanes = [deque(queue.popleft()) for _ in range(min(_LANES, len(queue)))]
        for pos, u in zip(positions, lane_rng.random(len(positions)), strict=True):
            i = int(u * len(lanes))
            order[pos] = lanes[i].popleft()
            if not lanes[i]:  # that file is done for this epoch: the next one takes its lane
                if queue:
                    lanes[i] = deque(queue.popleft())
                else:
                    lanes.pop(i)
        return order

    def _train_iter(self, batch_size: int, start_at: tuple[int, int]) -> Iterator[torch.Tensor]:
        buffer: list[bytes] = []
        epoch, first = start_at
        while True:
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            order = self._epoch_order(rng, epoch)
            for start in range(first if first < len(order) else 0, len(order), _BLOCKS_PER_READ):
                self.position = (epoch, start)
                for k in order[start : start + _BLOCKS_PER_READ]:
                    data = self._read_block(int(k))
                    if k in self._last_train:  # that file is done this epoch: its lane goes to the next one
                        self._train_cursors.close(self._blocks[k].file)
                    # About one window per window-length of text, so an epoch covers the block once.
                    n = len(data) // self._window
                    for off in rng.integers(0, len(data) - self._window + 1, size=n):
                        buffer.append(data[off : off + self._window])
                # Shuffling the buffer mixes windows from the blocks just read and any leftovers.
                buffer = [buffer[i] for i in rng.permutation(len(buffer))]
                while len(buffer) >= batch_size:
                    batch, buffer = buffer[:batch_size], buffer[batch_size:]
                    yield self._to_batch(batch)
            epoch, first = epoch + 1, 0

    def eval_windows(self, limit: int) -> list[tuple[int, int]]:
        """(block index, offset in the file's text) of up to ``limit`` held-out windows, in a fixed
        order: round-robin over the held-out blocks so evaluation samples the whole split."""
        blocks = self._block_indices(True)
        per_block = [self._blocks[k].length // self._window for k in blocks]
        out: list[tuple[int, int]] = []
        for j in range(max(per_block, default=0)):
            for k, n in zip(blocks, per_block, strict=True):
                if j < n and len(out) < limit:
                    out.append((k, self._blocks[k].offset + j * self._window))
        return out

    def _eval_texts(self, windows: Sequence[tuple[int, int]]) -> list[bytes]:
        """The windows' bytes. Streamed files' windows are read in file/offset order, in one forward pass
        per file, and kept: every ``eval_windows`` list is a prefix of one fixed sequence, so the cache holds
        the largest list asked for (limit x window bytes) and later evaluations read none of it again."""
        keys = [(self._blocks[k].file, off) for k, off in windows]
        missing = {key for key in keys if self._sources[key[0]].format.streamed and key not in self._eval_cache}
        try:
            for fi, off in sorted(missing):
                self._eval_cache[fi, off] = self._read_text(fi, off, self._window, self._eval_cursors)
        finally:
            self._eval_cursors.close_all()
        cache, window = self._eval_cache, self._window
        return [cache.get(key) or self._read(self._sources[key[0]].path, key[1], window) for key in keys]

    def eval_batches(self, batch_size: int, n_batches: int) -> list[torch.Tensor]:
        """Fixed held-out batches; the last one may be smaller if the split runs out."""
        if batch_size < 1 or n_batches < 0:
            raise ValueError("batch_size must be >= 1 and n_batches >= 0")
        windows = self._eval_texts(self.eval_windows(batch_size * n_batches))
        return [self._to_batch(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
