"""Training text streamed from the user's own files.

The corpus is never loaded whole: construction only stats the files (and peeks at their
first 4 KiB to reject binaries), and batches are cut from a few blocks read at a time.
Every block has a fixed global index, so the held-out split is the same on every run.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from node.errors import DataPathError

MAX_BLOCK_BYTES = 64 * 1024
EVAL_EVERY = 20  # block k is held out when k % EVAL_EVERY == EVAL_EVERY - 1
_SNIFF_BYTES = 4096
_BLOCKS_PER_READ = 4
_GLOB_CHARS = ("*", "?", "[")


class DataError(DataPathError):
    """The training data cannot be used; the message says what to change."""


@dataclass(frozen=True)
class _Block:
    file: int  # index into TextData.files
    offset: int
    length: int
    held_out: bool


def _looks_binary(path: str) -> bool:
    with open(path, "rb") as fh:
        return b"\0" in fh.read(_SNIFF_BYTES)


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


def _stdlib_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return glob.glob(os.path.join(glob.escape(stdlib), "*.py"))


class TextData:
    """Byte windows of ``seq_len + 1`` from a file, a directory, a glob, or the default corpus."""

    def __init__(self, spec: str | None, seq_len: int, *, seed: int = 0) -> None:
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        self.seq_len = seq_len
        self.seed = seed
        self.position: tuple[int, int] = (0, 0)  # (epoch, read group) the training stream is in
        self._window = seq_len + 1
        if spec is None:
            self.source = "python stdlib (default corpus)"
            candidates = _stdlib_files()
        else:
            self.source = spec
            candidates = self._resolve(spec)
        self._files, self._sizes, skipped = self._filter(sorted(candidates), spec)
        self._skipped = skipped
        total = sum(self._sizes)
        # Small corpora get smaller blocks so that roughly 40 exist and some are held out.
        self.block_bytes = max(self._window, min(MAX_BLOCK_BYTES, total // 40))
        self._blocks = self._cut_blocks()

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

    def _filter(self, candidates: Sequence[str], spec: str | None) -> tuple[list[str], list[int], int]:
        files: list[str] = []
        sizes: list[int] = []
        too_short = binary = empty = 0
        for path in candidates:
            try:
                size = os.stat(path).st_size
                if size == 0:
                    empty += 1
                    continue
                if _looks_binary(path):
                    binary += 1
                    continue
            except PermissionError:
                raise DataError(
                    f"cannot read data file {path}: permission denied; fix its permissions or exclude it from --data"
                ) from None
            except OSError as err:
                raise DataError(
                    f"cannot read data file {path}: {err.strerror}; fix it or exclude it from --data"
                ) from None
            # A file shorter than one window cannot yield a single training example.
            if size < self._window:
                too_short += 1
                continue
            files.append(path)
            sizes.append(size)
        if not files:
            where = "the python standard library" if spec is None else spec
            raise DataError(
                f"no usable text in {where}: {len(candidates)} file(s) found, {binary} binary, {empty} empty, "
                f"{too_short} shorter than {self._window} bytes; pass --data with text files of at least that size"
            )
        return files, sizes, binary + empty + too_short

    def _cut_blocks(self) -> list[_Block]:
        spans: list[tuple[int, int, int]] = []
        b = self.block_bytes
        for fi, size in enumerate(self._sizes):
            n = max(1, size // b)
            for j in range(n):
                # The file's tail joins its last block, so no block is shorter than a window.
                length = b if j < n - 1 else size - j * b
                spans.append((fi, j * b, length))
        held = {k for k in range(len(spans)) if k % EVAL_EVERY == EVAL_EVERY - 1}
        if not held and len(spans) >= 2:
            held = {len(spans) - 1}
        return [_Block(fi, off, ln, k in held) for k, (fi, off, ln) in enumerate(spans)]

    # -- properties --------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        return list(self._files)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes)

    @property
    def has_eval(self) -> bool:
        return any(b.held_out for b in self._blocks)

    def _block_indices(self, held_out: bool) -> list[int]:
        return [k for k, b in enumerate(self._blocks) if b.held_out == held_out]

    def describe(self) -> str:
        n_eval = len(self._block_indices(True))
        n_train = len(self._blocks) - n_eval
        skipped = f" ({self._skipped} skipped: binary, empty or too short)" if self._skipped else ""
        eval_note = "" if n_eval else " (corpus too small for a held-out split: no eval)"
        return (
            f"{len(self._files)} file(s){skipped}, {self.total_bytes:,} bytes, {n_train} train / {n_eval} eval "
            f"blocks of {self.block_bytes:,} bytes{eval_note}; source: {self.source}"
        )

    # -- reading -----------------------------------------------------------------------

    def _read(self, path: str, offset: int, length: int) -> bytes:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        except FileNotFoundError:
            raise DataError(f"data file {path} disappeared while training; restore it or restart the node") from None
        except PermissionError:
            raise DataError(
                f"data file {path} became unreadable (permission denied); fix its permissions or restart the node"
            ) from None
        except OSError as err:
            raise DataError(f"cannot read data file {path}: {err.strerror}; fix it or restart the node") from None
        if len(data) < length:
            raise DataError(f"data file {path} shrank while training; restart the node so the corpus is re-scanned")
        return data

    def _read_block(self, k: int) -> bytes:
        b = self._blocks[k]
        return self._read(self._files[b.file], b.offset, b.length)

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

    def _train_iter(self, batch_size: int, start_at: tuple[int, int]) -> Iterator[torch.Tensor]:
        train = np.array(self._block_indices(False))
        buffer: list[bytes] = []
        epoch, first = start_at
        while True:
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            order = train[rng.permutation(len(train))]
            for start in range(first if first < len(order) else 0, len(order), _BLOCKS_PER_READ):
                self.position = (epoch, start)
                for k in order[start : start + _BLOCKS_PER_READ]:
                    data = self._read_block(int(k))
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
        """(block index, offset in file) of up to ``limit`` held-out windows, in a fixed order:
        round-robin over the held-out blocks so evaluation samples the whole split."""
        blocks = self._block_indices(True)
        per_block = [self._blocks[k].length // self._window for k in blocks]
        out: list[tuple[int, int]] = []
        for j in range(max(per_block, default=0)):
            for k, n in zip(blocks, per_block, strict=True):
                if j < n and len(out) < limit:
                    out.append((k, self._blocks[k].offset + j * self._window))
        return out

    def eval_batches(self, batch_size: int, n_batches: int) -> list[torch.Tensor]:
        """Fixed held-out batches; the last one may be smaller if the split runs out."""
        if batch_size < 1 or n_batches < 0:
            raise ValueError("batch_size must be >= 1 and n_batches >= 0")
        windows = [
            self._read(self._files[self._blocks[k].file], off, self._window)
            for k, off in self.eval_windows(batch_size * n_batches)
        ]
        return [self._to_batch(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
