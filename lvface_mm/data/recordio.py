"""MXNet RecordIO (`.rec` + `.idx`) without mxnet: the container, the image-record header, readers
and a writer, byte for byte compatible with dmlc-core and `mx.recordio`.

Container. Every record on disk is

    magic 0xCED7230A (uint32 LE) | lrecord (uint32 LE) | payload chunk | zero padding to 4 bytes

where `lrecord` holds the chunk length in its low 29 bits and a continuation flag in its top 3
bits: 0 = whole record, 1 = first chunk, 2 = middle chunk, 3 = last chunk. The writer splits a
payload wherever the magic word appears at a 4-byte-aligned offset inside it: the chunk ends
there, those 4 bytes are dropped, and the reader puts the magic back between chunks. A reader
that ignores the flag silently corrupts those (rare) records.

Index. `.idx` is text, one `key<TAB>byte offset of the record's magic` line per record.

Image records (`mx.recordio.pack`). The payload starts with the 24-byte IR header, struct
`<IfQQ`: flag (uint32), label (float32), id (uint64), id2 (uint64). A scalar label lives in the
label field with flag 0; a vector label is written as `flag` float32 values right after the
header (the label field is then 0). The encoded image bytes follow.

What differs from mxnet and why:
    - The header is read and written explicitly little-endian (`<`); mxnet uses native order,
      which is the same bytes on every platform those files were made on.
    - Files are read with `os.pread` on a descriptor opened per process, so a reader can be shared
      with DataLoader workers (fork or spawn) without a shared file offset.
    - `RecordWriter` writes to `*.partial` files and renames them at the end, so an interrupted
      pack never leaves a half-written `.rec` next to a valid-looking `.idx`.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._text import read_int_table

RECORD_MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrecord
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
IR_HEADER_BYTES = _IR_HEADER.size  # 24
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_BYTES = _LENGTH_MASK  # the length field has 29 bits
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
    """A .rec/.idx file that does not follow the format; the message names the file and offset."""


# -- image-record header ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IRHeader:
    """The header `mx.recordio.pack` puts before each image.

    Attributes:
        label: a scalar class id (MS1M, im2rec) or a tuple of floats (Glint360K's [class, ...],
            InsightFace's meta record [a, b] and identity records [first, end)). Stored as float32.
        id: record id (im2rec writes the list index; our packer writes the record key).
        id2: second id, 0 unless a tool uses it.
    """

    label: float | tuple[float, ...] = 0.0
    id: int = 0
    id2: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.label, (tuple, list, np.ndarray)):
            values = tuple(float(v) for v in np.asarray(self.label, dtype=np.float32).reshape(-1))
            if not values:
                raise ValueError("IRHeader.label: a vector label needs at least one value (mxnet would store 0.0)")
            object.__setattr__(self, "label", values)
        else:
            object.__setattr__(self, "label", float(np.float32(self.label)))
        for name in ("id", "id2"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 1 << 64:
                raise ValueError(f"IRHeader.{name} must be an integer in [0, 2**64), got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def flag(self) -> int:
        """Number of float32 label values after the header; 0 for a scalar label."""
        return len(self.label) if isinstance(self.label, tuple) else 0

    @property
    def class_id(self) -> int:
        """The class: the scalar label, or the first element of a vector label (Glint360K)."""
        return int(self.label[0] if isinstance(self.label, tuple) else self.label)


def pack(header: IRHeader, image_bytes: bytes) -> bytes:
    """IR header (+ vector label) + encoded image -> one record payload."""
    if isinstance(header.label, tuple):
        head = _IR_HEADER.pack(header.flag, 0.0, header.id, header.id2)
        return head + np.asarray(header.label, dtype="<f4").tobytes() + bytes(image_bytes)
    return _IR_HEADER.pack(0, header.label, header.id, header.id2) + bytes(image_bytes)


def unpack(payload: bytes | memoryview, source: str = "record") -> tuple[IRHeader, bytes]:
    """One record payload -> (IR header, encoded image bytes)."""
    if len(payload) < IR_HEADER_BYTES:
        raise RecordIOError(f"{source}: {len(payload)} bytes is shorter than the {IR_HEADER_BYTES}-byte IR header")
    flag, label, rid, rid2 = _IR_HEADER.unpack_from(payload, 0)
    start = IR_HEADER_BYTES
    if flag > 0:
        end = start + 4 * flag
        if end > len(payload):
            raise RecordIOError(
                f"{source}: IR header says {flag} label floats but the record has only {len(payload)} bytes"
            )
        label = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=start))
        start = end
    return IRHeader(label, rid, rid2), bytes(payload[start:])


# -- container: framing ------------------------------------------------------------------------------


def _aligned_magic_offsets(payload: bytes) -> np.ndarray:
    """4-byte-aligned offsets where the payload contains the magic word (the writer's split points)."""
    words = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
    return np.flatnonzero(words == RECORD_MAGIC) * 4


def encode_record(payload: bytes) -> bytes:
    """One payload -> its bytes on disk: framed, split on aligned magic words, padded to 4 bytes."""
    payload = bytes(payload)
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds the RecordIO limit of {MAX_RECORD_BYTES} bytes")
    parts: list[bytes] = []
    start = 0
    for split in _aligned_magic_offsets(payload).tolist():
        cflag = _FIRST if start == 0 else _MIDDLE
        parts.append(_FRAME.pack(RECORD_MAGIC, (cflag << _LENGTH_BITS) | (split - start)))
        parts.append(payload[start:split])
        start = split + 4  # the magic itself is dropped; the reader re-inserts it
    cflag = _LAST if start else _WHOLE
    parts.append(_FRAME.pack(RECORD_MAGIC, (cflag << _LENGTH_BITS) | (len(payload) - start)))
    parts.append(payload[start:])
    # Middle chunks have lengths that are multiples of 4, so padding the total pads the last chunk.
    parts.append(b"\0" * (-len(payload) % 4))
    return b"".join(parts)


def decode_frames(buffer: bytes | memoryview, offset: int, source: str, base: int = 0) -> tuple[bytes, int]:
    """Read one (possibly chunked) record starting at `offset` in `buffer`.

    Args:
        buffer: bytes holding the record.
        offset: where its first magic word is in `buffer`.
        source: file name for error messages.
        base: file offset of `buffer[0]`, so messages name real file positions.

    Returns:
        (payload, offset in `buffer` just past the record's padding).

    Raises:
        RecordIOError: bad magic, a chunk running past the end, or chunks out of order.
    """
    chunks: list[bytes] = []
    while True:
        if offset + 8 > len(buffer):
            raise RecordIOError(f"{source}: record at byte {base + offset} is truncated (data ends inside its frame)")
        magic, lrec = _FRAME.unpack_from(buffer, offset)
        if magic != RECORD_MAGIC:
            raise RecordIOError(
                f"{source}: expected the RecordIO magic 0x{RECORD_MAGIC:08X} at byte {base + offset}, found "
                f"0x{magic:08X} (is the .idx from another .rec, or the file truncated/corrupt?)"
            )
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        start = offset + 8
        if start + length > len(buffer):
            raise RecordIOError(
                f"{source}: record at byte {base + offset} claims {length} bytes but only "
                f"{len(buffer) - start} remain"
            )
        if cflag > _LAST or (cflag in (_WHOLE, _FIRST)) != (not chunks):
            raise RecordIOError(
                f"{source}: chunk at byte {base + offset} has continuation flag {cflag} out of sequence"
            )
        chunks.append(bytes(buffer[start : start + length]))
        offset = start + length + (-length % 4)
        if cflag in (_WHOLE, _LAST):
            return (chunks[0] if len(chunks) == 1 else MAGIC_BYTES.join(chunks)), offset


def _incomplete(buffer: bytes | memoryview, pos: int) -> bool:
    """True when the record at `pos` is cut off by the end of `buffer` but well formed so far."""
    while True:
        if pos + 8 > len(buffer):
            return True
        magic, lrec = _FRAME.unpack_from(buffer, pos)
        if magic != RECORD_MAGIC:
            return False
        length = lrec & _LENGTH_MASK
        if pos + 8 + length > len(buffer):
            return True
        if lrec >> _LENGTH_BITS in (_WHOLE, _LAST):
            return False  # complete: whatever failed was something else
        pos += 8 + length + (-length % 4)


# -- index files ---------------------------------------------------------------------------------------


def read_index(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a `.idx` file -> (keys int64, byte offsets int64), in file order."""
    try:
        table = read_int_table(Path(path), columns=2)
    except ValueError as exc:
        raise RecordIOError(f"{exc}; a .idx line is '<key>\\t<byte offset>'") from None
    if (table < 0).any():
        line = int(np.flatnonzero((table < 0).any(axis=1))[0]) + 1
        raise RecordIOError(f"{path}:{line}: keys and offsets must be non-negative, got {table[line - 1].tolist()}")
    keys = np.ascontiguousarray(table[:, 0])
    if len(np.unique(keys)) != len(keys):
        raise RecordIOError(f"{path}: the index lists some keys more than once")
    return keys, np.ascontiguousarray(table[:, 1])


def resolve_record_paths(path: str | Path) -> tuple[Path, Path]:
    """Accept a directory holding `train.rec`/`train.idx`, a `.rec`/`.idx` path, or a prefix."""
    path = Path(path)
    if path.is_dir():
        rec, idx = path / "train.rec", path / "train.idx"
    elif path.suffix in (".rec", ".idx"):
        rec, idx = path.with_suffix(".rec"), path.with_suffix(".idx")
    else:
        rec, idx = Path(f"{path}.rec"), Path(f"{path}.idx")
    if not rec.is_file():
        raise FileNotFoundError(f"RecordIO file not found: {rec} (from {path!s})")
    return rec, idx


# -- reading -----------------------------------------------------------------------------------------


class RecordReader:
    """Random access (through `.idx`) and streaming reads of a `.rec` file.

    Safe to share with DataLoader workers: the file descriptor is opened lazily per process and
    every read is a positioned `pread`, so no worker moves another's file offset.

    Args:
        rec_path: the `.rec` file.
        idx_path: its `.idx`; None or a missing file leaves only streaming reads (`__iter__`).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.file_size = self.rec_path.stat().st_size
        self.idx_path = Path(idx_path) if idx_path is not None and Path(idx_path).is_file() else None
        self._fd: int | None = None
        self._pid: int | None = None
        if self.idx_path is not None:
            self.keys, self.offsets = read_index(self.idx_path)
            bad = np.flatnonzero(self.offsets + 8 > self.file_size)
            if bad.size:
                k = int(bad[0])
                raise RecordIOError(
                    f"{self.idx_path}: key {self.keys[k]} points to byte {self.offsets[k]}, past the end of "
                    f"{self.rec_path} ({self.file_size} bytes); index and data do not match"
                )
            # Index arrays only, no per-key Python objects: 42M keys stay ~1 GB of numpy memory
            # that forked DataLoader workers share, instead of a dict each worker copies.
            n = len(self.keys)
            self._dense = bool(n == 0 or (self.keys[0] == 0 and (np.diff(self.keys) == 1).all()))  # keys 0..n-1
            self._key_order = None if self._dense else np.argsort(self.keys, kind="stable")
            self._sorted_keys = None if self._dense else self.keys[self._key_order]
            # A record ends where the next one in file order starts, so one pread fetches it whole.
            if n and (np.diff(self.offsets) > 0).all():
                self._ends = None  # the usual case: index in file order, end = next offset
            else:
                order = np.argsort(self.offsets, kind="stable")
                self._ends = np.empty_like(self.offsets)
                self._ends[order] = np.append(self.offsets[order][1:], self.file_size)
        else:
            self.keys = self.offsets = self._ends = None
            self._dense, self._key_order, self._sorted_keys = True, None, None

    @classmethod
    def open(cls, path: str | Path) -> RecordReader:
        """`RecordReader` from a directory, a `.rec`/`.idx` path or a prefix (see `resolve_record_paths`)."""
        rec, idx = resolve_record_paths(path)
        return cls(rec, idx)

    # Pickling for DataLoader workers: ship paths and the parsed index, never a descriptor.
    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: os may already be gone
            self.close()

    def __len__(self) -> int:
        if self.keys is None:
            raise TypeError(f"{self.rec_path}: length needs the .idx file; use iteration to stream without it")
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return self.keys is not None and bool(self.slots_of(np.asarray([key]), strict=False)[0] >= 0)

    def slots_of(self, keys: np.ndarray, strict: bool = True) -> np.ndarray:
        """Positions of `keys` in the index (-1 for unknown keys unless `strict`, which raises KeyError)."""
        keys = np.asarray(keys, dtype=np.int64)
        n = len(self.keys)
        if self._dense:
            slots = np.where((keys >= 0) & (keys < n), keys, -1)
        else:
            pos = np.minimum(np.searchsorted(self._sorted_keys, keys), n - 1)  # n > 0: empty is dense
            slots = np.where(self._sorted_keys[pos] == keys, self._key_order[pos], -1)
        if strict and (slots < 0).any():
            raise KeyError(f"record key {int(keys[slots < 0][0])} is not in {self.idx_path}")
        return slots

    def _end(self, slot: int) -> int:
        if self._ends is not None:
            return int(self._ends[slot])
        return int(self.offsets[slot + 1]) if slot + 1 < len(self.offsets) else self.file_size

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self._descriptor(), size, offset)
        if len(data) != size:
            raise RecordIOError(f"{self.rec_path}: short read of {size} bytes at byte {offset} (file truncated?)")
        return data

    def read_at(self, offset: int, size_hint: int | None = None) -> bytes:
        """The payload of the record whose magic is at byte `offset`.

        Args:
            offset: byte offset of the record in the `.rec`.
            size_hint: bytes to fetch in one read; when it turns out too short (or is None) the
                frames are read one at a time.
        """
        if size_hint is not None and size_hint >= 8:
            buffer = self._pread(offset, min(size_hint, self.file_size - offset))
            try:
                return decode_frames(buffer, 0, str(self.rec_path), base=offset)[0]
            except RecordIOError:
                if not _incomplete(buffer, 0):
                    raise
        return self._read_frames_slowly(offset)

    def _read_frames_slowly(self, offset: int) -> bytes:
        # Frame by frame: each 8-byte frame word says how much to read next. decode_frames then
        # validates the collected bytes with the same checks as every other path.
        raw: list[bytes] = []
        pos = offset
        while True:
            head = self._pread(pos, 8)
            magic, lrec = _FRAME.unpack(head)
            if magic != RECORD_MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: expected the RecordIO magic 0x{RECORD_MAGIC:08X} at byte {pos}, "
                    f"found 0x{magic:08X}"
                )
            length = lrec & _LENGTH_MASK
            padded = min(length + (-length % 4), self.file_size - pos - 8)
            raw.append(head + self._pread(pos + 8, padded))
            pos += 8 + padded
            if lrec >> _LENGTH_BITS in (_WHOLE, _LAST) or pos >= self.file_size:
                return decode_frames(b"".join(raw), 0, str(self.rec_path), base=offset)[0]

    def read(self, key: int) -> bytes:
        """The payload stored under `key` in the index."""
        if self.keys is None:
            raise KeyError(f"record key {key} is not in {self.rec_path} (no .idx file)")
        key, n = int(key), len(self.keys)
        if self._dense and 0 <= key < n:  # the usual index: key == position, no search
            slot = key
        else:
            slot = int(self.slots_of(np.asarray([key]))[0])
        offset = int(self.offsets[slot])
        return self.read_at(offset, self._end(slot) - offset)

    def __iter__(self) -> Iterator[bytes]:
        """Stream every payload in file order (needs no index)."""
        for _, payload in self.iter_with_offsets():
            yield payload

    def iter_with_offsets(self, block_bytes: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
        """Stream (byte offset, payload) in file order, reading the file in large blocks."""
        if block_bytes < 8:
            raise ValueError(f"block_bytes must be at least 8, got {block_bytes}")
        source = str(self.rec_path)
        with open(self.rec_path, "rb", buffering=0) as f:
            buffer, base = b"", 0  # buffer[0] is at file offset `base`
            skip = 0  # padding of the last record that lies in the next block
            while True:
                block = f.read(block_bytes)
                eof = not block
                if skip:
                    block, skip = block[skip:], max(skip - len(block), 0)
                buffer = buffer + block if buffer else block
                pos, size = 0, len(buffer)
                while pos < size:
                    # Fast path for the common case, a whole record inside the buffer; everything
                    # else (chunks, truncation, bad magic) goes through decode_frames and its checks.
                    if pos + 8 <= size:
                        magic, lrec = _FRAME.unpack_from(buffer, pos)
                        end = pos + 8 + (lrec & _LENGTH_MASK)
                        if magic == RECORD_MAGIC and lrec >> _LENGTH_BITS == _WHOLE and end <= size:
                            yield base + pos, buffer[pos + 8 : end]
                            pos = end + (-(lrec & _LENGTH_MASK) % 4)
                            continue
                    try:
                        payload, end = decode_frames(buffer, pos, source, base=base)
                    except RecordIOError:
                        if not eof and _incomplete(buffer, pos):
                            break  # the record continues in the next block
                        raise
                    yield base + pos, payload
                    pos = end
                skip = max(pos - size, 0)
                buffer, base = buffer[pos:], base + pos
                if eof:
                    return

    def read_headers(self, keys: np.ndarray | None = None, block_bytes: int = 1 << 20) -> HeaderTable:
        """IR headers of many records at once, without decoding payloads (labels for samplers).

        Reads the `.rec` in large sequential blocks and pulls the 36 bytes at each record's offset
        (frame, IR header, first vector-label float) with one vectorised gather per block. Records
        split on the magic, or whose first chunk is shorter than a header, are decoded exactly.

        Args:
            keys: index keys to read (default: every key, in index order).
            block_bytes: bytes per sequential read.
        """
        if self.keys is None:
            raise TypeError(f"{self.rec_path}: read_headers needs the .idx file")
        if keys is None:
            keys, offsets = self.keys, self.offsets
        else:
            keys = np.asarray(keys, dtype=np.int64)
            offsets = self.offsets[self.slots_of(keys)]
        order = np.argsort(offsets, kind="stable")
        sorted_offsets = offsets[order]
        aligned = not (sorted_offsets % 4).any()  # always, for files written by dmlc or by us
        words = np.zeros((len(keys), 9), dtype="<u4")  # magic, lrec, flag, label, id lo/hi, id2 lo/hi, label[0]
        fd, pending = self._descriptor(), 0
        # One reused, uninitialised buffer, small enough to stay in cache between the read and the
        # gather (a fresh bytes object per block would cost page faults plain reads do not pay).
        buffer = np.empty(max(block_bytes, 64) // 4 * 4, dtype=np.uint8)
        while pending < len(order):
            start = int(sorted_offsets[pending])
            count = _pread_into(fd, buffer, start)
            end = start + count
            # Records whose 36 header bytes lie in this block (at the end of the file one may be shorter).
            limit = end - (36 if end < self.file_size else 8)
            stop = max(pending + int(np.searchsorted(sorted_offsets[pending:], limit, side="right")), pending + 1)
            rel = sorted_offsets[pending:stop] - start  # (R,) byte offsets inside the block
            if aligned:
                block = buffer[: count // 4 * 4].view("<u4")
                words[order[pending:stop]] = block[np.minimum(rel[:, None] // 4 + np.arange(9), len(block) - 1)]
            else:
                block = buffer[:count]
                gathered = block[np.minimum(rel[:, None] + np.arange(36), count - 1)]  # (R, 36)
                words[order[pending:stop]] = gathered.view("<u4")
            pending = stop
        bad = np.flatnonzero(words[:, 0] != RECORD_MAGIC)
        if bad.size:
            k = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path}: key {keys[k]} (byte {offsets[k]}) does not start with the RecordIO magic; "
                "the .idx and .rec do not match"
            )
        cflag, length, flag = words[:, 1] >> _LENGTH_BITS, words[:, 1] & _LENGTH_MASK, words[:, 2]
        label = words[:, 3].view("<f4").copy()
        first = words[:, 8].view("<f4")
        vector = flag > 0
        label[vector] = first[vector]
        table = HeaderTable(
            keys=keys.copy(),
            flag=flag.astype(np.int64),
            label=label,
            id=words[:, 4].astype(np.uint64) | (words[:, 5].astype(np.uint64) << np.uint64(32)),
            id2=words[:, 6].astype(np.uint64) | (words[:, 7].astype(np.uint64) << np.uint64(32)),
        )
        # Exact path for the rare records the gather cannot read: split ones, or headers cut short.
        short = (cflag != _WHOLE) | (length < IR_HEADER_BYTES + np.where(vector, 4, 0))
        for i in np.flatnonzero(short).tolist():
            header, _ = unpack(self.read(int(keys[i])), source=f"{self.rec_path} key {keys[i]}")
            table.flag[i], table.id[i], table.id2[i] = header.flag, header.id, header.id2
            table.label[i] = header.label[0] if isinstance(header.label, tuple) else header.label
        return table


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> int:
    """Fill `buffer` from file offset `offset` (fewer bytes at the end of the file); returns the count."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)  # platforms without preadv
    buffer[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


@dataclass(frozen=True)
class HeaderTable:
    """IR header fields of many records, one row per key.

    Attributes:
        keys: (N,) int64 index keys.
        flag: (N,) number of vector-label floats (0 = scalar label).
        label: (N,) float32 scalar label, or the first element of a vector label (the class id in
            every InsightFace convention).
        id: (N,) uint64.
        id2: (N,) uint64.
    """

    keys: np.ndarray
    flag: np.ndarray
    label: np.ndarray
    id: np.ndarray
    id2: np.ndarray


# -- writing -----------------------------------------------------------------------------------------


class RecordWriter:
    """Write a `.rec` and its `.idx`, atomically.

    Data goes to `<path>.partial` files that are renamed over the targets by `close()`; an
    exception inside a `with` block deletes them and leaves any existing files untouched.

    Args:
        rec_path: output `.rec`.
        idx_path: output `.idx`; None writes no index.
        overwrite: replace existing outputs (otherwise they are an error, before anything is written).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, overwrite: bool = False) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        targets = [p for p in (self.rec_path, self.idx_path) if p is not None]
        if not overwrite:
            existing = [str(p) for p in targets if p.exists()]
            if existing:
                raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True)")
        for p in targets:
            p.parent.mkdir(parents=True, exist_ok=True)
        # The writer owns these handles until close()/abort(); it is itself the context manager.
        self._rec = open(_partial(self.rec_path), "wb")  # noqa: SIM115
        self._idx = open(_partial(self.idx_path), "w", encoding="ascii") if self.idx_path else None  # noqa: SIM115
        self._keys: set[int] = set()
        self.position = 0
        self.count = 0

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Append one record; with `key`, also index it. Returns the record's byte offset."""
        if self._rec.closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        offset = self.position
        data = encode_record(payload)
        self._rec.write(data)
        self.position += len(data)
        self.count += 1
        if key is not None:
            if self._idx is None:
                raise ValueError("write(..., key=) needs an idx_path")
            key = int(key)
            if key < 0 or key in self._keys:
                raise ValueError(f"record key {key} is negative or already written")
            self._keys.add(key)
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def rewrite(self, offset: int, payload: bytes) -> None:
        """Replace a record already written at `offset` with one of exactly the same encoded size."""
        data = encode_record(payload)
        self._rec.flush()
        with open(_partial(self.rec_path), "r+b") as f:
            f.seek(offset)
            magic, lrec = _FRAME.unpack(f.read(8))
            length = lrec & _LENGTH_MASK
            if magic != RECORD_MAGIC or lrec >> _LENGTH_BITS != _WHOLE or 8 + length + (-length % 4) != len(data):
                raise ValueError(f"rewrite at byte {offset}: the new record must replace a whole record of equal size")
            f.seek(offset)
            f.write(data)

    def close(self) -> None:
        """Flush and move the finished files into place."""
        if self._rec.closed:
            return
        for f in (self._rec, self._idx):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        os.replace(_partial(self.rec_path), self.rec_path)
        if self.idx_path is not None:
            os.replace(_partial(self.idx_path), self.idx_path)

    def abort(self) -> None:
        """Drop everything written so far; existing target files are not touched."""
        for f, path in ((self._rec, self.rec_path), (self._idx, self.idx_path)):
            if f is not None:
                f.close()
                Path(_partial(path)).unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _partial(path: Path | None) -> str:
    return f"{path}.partial"
