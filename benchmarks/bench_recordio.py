"""RecordIO read throughput against plain sequential reading of the same file, in one run.

    python benchmarks/bench_recordio.py --quick
    python benchmarks/bench_recordio.py --records 200000 --repeats 5

Builds a `.rec`/`.idx` of aligned-face-sized JPEGs in the InsightFace layout (temporary folder),
reads it once to warm the page cache, then times (median of `--repeats` runs):

    raw            sequential `readinto` of the whole file in 16 MB blocks (the reference)
    headers (idx)  `RecordReader.read_headers()`: every IR header through the index
    stream         `iter_with_offsets()`: every payload in file order, no index, + IR header unpack
    random         `RecordReader.read(key)` in shuffled key order (payload bytes, no decode)
    decode         `RecordDataset.read_image(i)`: payload + JPEG decode (on a subset)

Ratios are records/s relative to raw (raw records/s = file records / raw seconds). The issue's
target: headers at >= 80% of raw read speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lvface_mm.data import IRHeader, RecordDataset, RecordReader, RecordWriter, pack


def _face_like_jpegs(count: int, quality: int = 95) -> list[bytes]:
    """JPEGs with the byte size of real 112x112 q95 face crops (~5-8 KB): smooth shapes plus texture."""
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        low = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
        texture = rng.normal(0, 12, (112, 112, 3))
        image = np.clip(low + texture, 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        out.append(buf.tobytes())
    return out


def build(folder: Path, records: int, identities: int) -> tuple[Path, int]:
    jpegs = _face_like_jpegs(256)
    per_id = max(1, records // identities)
    with RecordWriter(folder / "train.rec", folder / "train.idx") as w:
        w.write(pack(IRHeader((0.0, 0.0)), b""), key=0)
        key, ranges = 1, []
        for c in range(identities):
            first = key
            for _ in range(per_id):
                w.write(pack(IRHeader(float(c), id=key), jpegs[key % len(jpegs)]), key=key)
                key += 1
            ranges.append((first, key))
        a = key
        for first, end in ranges:
            w.write(pack(IRHeader((float(first), float(end))), b""), key=key)
            key += 1
        w.rewrite(0, pack(IRHeader((float(a), float(key))), b""))
    return folder / "train.rec", a - 1


def time_raw(path: Path) -> float:
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def time_headers(reader: RecordReader) -> float:
    t = time.perf_counter()
    table = reader.read_headers()
    elapsed = time.perf_counter() - t
    assert len(table.keys) == len(reader)
    return elapsed


def time_stream(reader: RecordReader) -> float:
    import struct

    unpack_header = struct.Struct("<IfQQ").unpack_from
    t = time.perf_counter()
    n = 0
    for _, payload in reader.iter_with_offsets():
        unpack_header(payload, 0)
        n += 1
    elapsed = time.perf_counter() - t
    assert n == len(reader)
    return elapsed


def time_random(reader: RecordReader, keys: np.ndarray) -> float:
    t = time.perf_counter()
    for k in keys.tolist():
        reader.read(k)
    return time.perf_counter() - t


def time_decode(dataset: RecordDataset, count: int) -> float:
    t = time.perf_counter()
    for i in range(count):
        dataset.read_image(i)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k records, 3 repeats")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-records", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the file (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.repeats, args.decode_records = 20_000, 3, 3_000
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rec, images = build(Path(tmp), args.records, identities=max(1, args.records // 50))
        size = rec.stat().st_size
        reader = RecordReader.open(rec)
        dataset = RecordDataset(Path(tmp))
        total = len(reader)
        time_raw(rec)  # warm the page cache: every method then reads from memory
        rng = np.random.default_rng(0)
        keys = rng.permutation(reader.keys)
        decode_n = min(args.decode_records, images)
        results: dict[str, list[float]] = {k: [] for k in ("raw", "headers", "stream", "random", "decode")}
        for _ in range(args.repeats):
            results["raw"].append(time_raw(rec))
            results["headers"].append(time_headers(reader))
            results["stream"].append(time_stream(reader))
            results["random"].append(time_random(reader, keys))
            results["decode"].append(time_decode(dataset, decode_n))
        med = {k: statistics.median(v) for k, v in results.items()}
        counts = {"raw": total, "headers": total, "stream": total, "random": total, "decode": decode_n}
        raw_rate = total / med["raw"]
        print(f"file: {total:,} records ({images:,} images), {size / 1e6:.1f} MB, "
              f"{size / total / 1e3:.2f} KB/record; median of {args.repeats} runs; cpu count {os.cpu_count()}")
        print("| method | records/s | MB/s | vs raw |")
        print("|---|---:|---:|---:|")
        for name in ("raw", "headers", "stream", "random", "decode"):
            rate = counts[name] / med[name]
            mbs = size * counts[name] / total / med[name] / 1e6
            print(f"| {name} | {rate:,.0f} | {mbs:,.0f} | {rate / raw_rate:.2f} |")
        reader.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
