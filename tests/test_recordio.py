"""RecordIO container, IR header, InsightFace layout, RecordDataset and `lvface-mm pack`."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lvface_mm.cli import main
from lvface_mm.data import (
    RECORD_MAGIC,
    IRHeader,
    RecordDataset,
    RecordIOError,
    RecordReader,
    RecordWriter,
    encode_record,
    pack,
    pack_identity_folder,
    read_layout,
    unpack,
)
from lvface_mm.data.recordio import decode_frames
from tests._datasets_and_eval_fixtures import jpeg_bytes, pattern_image, png_bytes, write_identity_tree

MAGIC = struct.pack("<I", RECORD_MAGIC)


def _frame(cflag: int, chunk: bytes) -> bytes:
    """One chunk on disk, built by hand from the format description."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(chunk)) + chunk + b"\0" * (-len(chunk) % 4)


def _write_raw(tmp_path, records: list[bytes], name: str = "raw"):
    """Write hand-framed records plus a .idx; returns (rec path, offsets)."""
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    offsets, blob = [], b""
    for r in records:
        offsets.append(len(blob))
        blob += r
    rec.write_bytes(blob)
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    return rec, offsets


def _count_frames(data: bytes) -> int:
    count, pos = 0, 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == RECORD_MAGIC
        length = lrec & ((1 << 29) - 1)
        pos += 8 + length + (-length % 4)
        count += 1
    return count


def test_hand_built_record_decodes_to_known_fields(tmp_path):
    # IR header by hand: flag 0, label 3.0 (0x40400000), id 7, id2 9, then 5 "image" bytes.
    payload = bytes.fromhex("00000000" "00004040" "0700000000000000" "0900000000000000") + b"JPEG!"
    on_disk = bytes.fromhex("0a23d7ce") + struct.pack("<I", len(payload)) + payload + b"\0\0\0"
    rec, _ = _write_raw(tmp_path, [on_disk])
    with RecordReader(rec, rec.with_suffix(".idx")) as reader:
        header, image = unpack(reader.read(0))
    assert header == IRHeader(3.0, id=7, id2=9)
    assert header.flag == 0 and header.class_id == 3
    assert image == b"JPEG!"
    # Our writer produces exactly these bytes.
    assert encode_record(pack(IRHeader(3.0, 7, 9), b"JPEG!")) == on_disk


def test_hand_built_split_record_rejoins_with_magic(tmp_path):
    # A payload with the magic at aligned offsets 8 and 12 is stored as three chunks by dmlc's writer.
    payload = b"ABCDEFGH" + MAGIC + MAGIC + b"tail!"
    on_disk = _frame(1, b"ABCDEFGH") + _frame(2, b"") + _frame(3, b"tail!")
    assert encode_record(payload) == on_disk
    rec, _ = _write_raw(tmp_path, [on_disk, _frame(0, b"next")])
    reader = RecordReader(rec, rec.with_suffix(".idx"))
    assert reader.read(0) == payload
    assert reader.read(1) == b"next"
    assert list(reader) == [payload, b"next"]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        MAGIC,  # the magic is the whole payload
        MAGIC + b"x",  # at offset 0
        b"abcd" + MAGIC,  # as the last aligned word
        b"ab" + MAGIC + b"cd",  # unaligned: must not split
        MAGIC * 5,  # consecutive
        b"\x00" * 4096 + MAGIC + b"\x01" * 4093 + MAGIC + b"\x02" * 3,
    ],
)
def test_split_records_round_trip(tmp_path, payload):
    aligned_hits = sum(payload[i : i + 4] == MAGIC for i in range(0, len(payload) // 4 * 4, 4))
    data = encode_record(payload)
    assert _count_frames(data) == aligned_hits + 1  # the writer splits exactly at aligned magic words
    assert len(data) % 4 == 0
    assert decode_frames(data, 0, "mem")[0] == payload
    with RecordWriter(tmp_path / "s.rec", tmp_path / "s.idx") as w:
        w.write(b"before", key=0)
        w.write(payload, key=1)
        w.write(b"after", key=2)
    reader = RecordReader.open(tmp_path / "s")
    assert [reader.read(k) for k in range(3)] == [b"before", payload, b"after"]
    assert [p for _, p in reader.iter_with_offsets(block_bytes=16)] == [b"before", payload, b"after"]


def test_scalar_and_vector_labels_round_trip(tmp_path):
    headers = [
        IRHeader(5.0, id=1),
        IRHeader((12.0, 0.5, -3.0), id=2**40 + 3, id2=2**63),
        IRHeader(0.0),
        IRHeader((7.0,), id=4),
    ]
    images = [b"img-a", b"", jpeg_bytes(pattern_image(1)), MAGIC * 3]
    with RecordWriter(tmp_path / "v.rec", tmp_path / "v.idx") as w:
        for k, (h, img) in enumerate(zip(headers, images)):
            w.write(pack(h, img), key=10 + k)
    reader = RecordReader.open(tmp_path / "v.rec")
    for k, (h, img) in enumerate(zip(headers, images)):
        got_header, got_image = unpack(reader.read(10 + k))
        assert got_header == h and got_image == img
    assert headers[1].flag == 3 and headers[1].class_id == 12
    table = reader.read_headers()
    np.testing.assert_array_equal(table.keys, [10, 11, 12, 13])
    np.testing.assert_array_equal(table.flag, [0, 3, 0, 1])
    np.testing.assert_array_equal(table.label, [5.0, 12.0, 0.0, 7.0])
    np.testing.assert_array_equal(table.id, np.array([1, 2**40 + 3, 0, 4], dtype=np.uint64))
    assert int(table.id2[1]) == 2**63


def test_read_headers_matches_exact_decode_on_many_records(tmp_path):
    rng = np.random.default_rng(0)
    headers = []
    with RecordWriter(tmp_path / "m.rec", tmp_path / "m.idx") as w:
        for k in range(300):
            label = float(k % 17) if k % 3 else (float(k % 17), 1.0)
            # Some ids put the magic inside the IR header, so its first chunk is cut short.
            h = IRHeader(label, id=RECORD_MAGIC if k % 50 == 0 else k, id2=k * 3)
            headers.append(h)
            w.write(pack(h, rng.bytes(int(rng.integers(0, 600)))), key=k)
    reader = RecordReader.open(tmp_path / "m")
    table = reader.read_headers(block_bytes=1000)  # many block boundaries
    np.testing.assert_array_equal(table.label, [h.class_id for h in headers])
    np.testing.assert_array_equal(table.id, np.array([h.id for h in headers], dtype=np.uint64))
    np.testing.assert_array_equal(table.flag, [h.flag for h in headers])
    subset = reader.read_headers(np.array([299, 0, 150]))
    np.testing.assert_array_equal(subset.label, [headers[299].class_id, headers[0].class_id, headers[150].class_id])
    # Records at offsets that are not multiples of 4 (2 junk bytes in front) take the byte-gather path.
    (tmp_path / "shift.rec").write_bytes(b"\0\0" + (tmp_path / "m.rec").read_bytes())
    (tmp_path / "shift.idx").write_text("".join(f"{k}\t{o + 2}\n" for k, o in zip(reader.keys, reader.offsets)))
    shifted = RecordReader.open(tmp_path / "shift")
    np.testing.assert_array_equal(shifted.read_headers(block_bytes=999).label, table.label)
    assert shifted.read(17) == reader.read(17)
    # An index listed out of file order (sizes then come from the sorted offsets).
    lines = (tmp_path / "m.idx").read_text().splitlines()
    (tmp_path / "m.idx").write_text("\n".join(reversed(lines)) + "\n")
    shuffled = RecordReader.open(tmp_path / "m")
    assert [shuffled.read(k) for k in range(300)] == [reader.read(k) for k in range(300)]
    np.testing.assert_array_equal(shuffled.read_headers(np.arange(300)).label, table.label)


def test_streaming_without_index(tmp_path):
    payloads = [bytes([k]) * (k * 37 % 200) for k in range(60)]
    with RecordWriter(tmp_path / "n.rec") as w:
        offsets = [w.write(p) for p in payloads]
    reader = RecordReader(tmp_path / "n.rec")
    assert list(reader) == payloads
    for block_bytes in (8, 9, 11, 13, 64, 1000):  # records, padding and frames cut at every kind of boundary
        assert [o for o, _ in reader.iter_with_offsets(block_bytes=block_bytes)] == offsets
        assert [p for _, p in reader.iter_with_offsets(block_bytes=block_bytes)] == payloads
    assert reader.read_at(offsets[7]) == payloads[7]
    with pytest.raises(TypeError, match="needs the .idx"):
        len(reader)


def test_bad_files_give_clear_errors(tmp_path):
    with RecordWriter(tmp_path / "b.rec", tmp_path / "b.idx") as w:
        w.write(b"x" * 40, key=0)
        w.write(b"y" * 40, key=1)
    (tmp_path / "wrong.idx").write_text("0\t0\n1\t4\n")
    reader = RecordReader(tmp_path / "b.rec", tmp_path / "wrong.idx")
    with pytest.raises(RecordIOError, match=r"b\.rec.*magic.*byte 4"):
        reader.read(1)
    with pytest.raises(KeyError, match="key 5"):
        reader.read(5)
    (tmp_path / "bad.idx").write_text("0\t0\nzero\tone\n")
    with pytest.raises(RecordIOError, match=r"bad\.idx:2"):
        RecordReader(tmp_path / "b.rec", tmp_path / "bad.idx")
    (tmp_path / "far.idx").write_text("0\t0\n1\t99999\n")
    with pytest.raises(RecordIOError, match="past the end"):
        RecordReader(tmp_path / "b.rec", tmp_path / "far.idx")
    data = (tmp_path / "b.rec").read_bytes()
    (tmp_path / "t.rec").write_bytes(data[:-20])  # truncated inside the second record
    with pytest.raises(RecordIOError, match=r"t\.rec.*byte 48"):
        list(RecordReader(tmp_path / "t.rec"))
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack(b"short")


def test_writer_is_atomic_and_never_clobbers(tmp_path):
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(b"kept", key=0)
    before = (tmp_path / "a.rec").read_bytes()
    with pytest.raises(FileExistsError):
        RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx")
    writer = RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx", overwrite=True)
    with pytest.raises(RuntimeError, match="boom"), writer as w:
        w.write(b"new", key=0)
        raise RuntimeError("boom")
    assert (tmp_path / "a.rec").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]


@pytest.fixture
def packed(tmp_path):
    src = write_identity_tree(tmp_path / "src", identities=3, per_identity=3)
    result = pack_identity_folder(src, tmp_path / "out", progress=False, workers=2)
    return src, tmp_path / "out", result


def test_pack_writes_insightface_layout(packed):
    src, out, result = packed
    assert result.num_images == 9 and result.num_classes == 3 and not result.skipped
    reader = RecordReader.open(out)
    meta, rest = unpack(reader.read(0))
    assert meta.label == (10.0, 13.0) and rest == b""  # images are keys 1..9, identities 10..12
    layout = read_layout(reader)
    assert layout.kind == "insightface"
    np.testing.assert_array_equal(layout.image_keys, np.arange(1, 10))
    ds = RecordDataset(out)
    np.testing.assert_array_equal(ds.identity_ranges(), [[1, 4], [4, 7], [7, 10]])
    np.testing.assert_array_equal(ds.labels(), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert ds.num_classes == 3
    # Aligned JPEG/PNG files are stored byte for byte.
    _, stored = ds.read_header(0)
    assert stored == (src / "id_00" / "img_0.jpg").read_bytes()
    _, stored_png = ds.read_header(2)
    assert stored_png == (src / "id_00" / "img_2.png").read_bytes()
    assert (out / "property").read_text() == "3,112,112\n"
    assert (out / "identities.tsv").read_text().splitlines() == ["0\tid_00", "1\tid_01", "2\tid_02"]


def test_record_dataset_items_and_distributed_sampler(packed):
    src, out, _ = packed
    ds = RecordDataset(out)
    image, label = ds[4]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1
    import cv2

    expected = cv2.imread(str(src / "id_01" / "img_1.jpg"))[:, :, ::-1].astype(np.float32)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), (expected - 127.5) / 127.5, atol=1e-6)
    assert image.min() >= -1 and image.max() <= 1
    # Two ranks get 5 indices each (9 padded to 10) covering the set; rank 0 loads through a worker process.
    all_labels = ds.labels()
    covered = set()
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=False)
        indices = list(sampler)
        covered |= set(indices)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1 if rank == 0 else 0)
        labels = torch.cat([batch_labels for _, batch_labels in loader])
        assert labels.tolist() == all_labels[indices].tolist()
    assert covered == set(range(9))


def test_plain_layout_and_forced_layouts(tmp_path):
    # im2rec-style: no meta record, every key is an image (key 0 included).
    with RecordWriter(tmp_path / "p.rec", tmp_path / "p.idx") as w:
        for k in range(4):
            w.write(pack(IRHeader(float(k % 2), id=k), jpeg_bytes(pattern_image(k))), key=k)
    ds = RecordDataset(tmp_path / "p")
    assert len(ds) == 4 and ds.layout.kind == "plain" and ds.num_classes == 2
    assert int(ds[0][1]) == 0 and int(ds[3][1]) == 1
    with pytest.raises(RecordIOError, match="not an InsightFace meta record"):
        RecordDataset(tmp_path / "p", layout="insightface")
    with pytest.raises(IndexError, match="out of range"):
        ds[4]


def test_dataset_rejects_unaligned_sizes(tmp_path):
    with RecordWriter(tmp_path / "q.rec", tmp_path / "q.idx") as w:
        w.write(pack(IRHeader(0.0), jpeg_bytes(pattern_image(0, size=96))), key=0)
        w.write(pack(IRHeader(0.0), b"not an image"), key=1)
    ds = RecordDataset(tmp_path / "q")
    with pytest.raises(ValueError, match=r"q\.rec key 0: image is 96x96, expected an aligned 112x112"):
        ds[0]
    with pytest.raises(ValueError, match="key 1: 12 bytes are not a decodable image"):
        ds[1]


class _FixedLandmarks:
    """A detector stand-in that 'finds' one face at known landmarks (the packer is under test)."""

    def __init__(self, landmarks):
        from lvface_mm.faces.detection import DetectedFace

        self.face = DetectedFace(np.array([0, 0, 150, 150]), 0.9, landmarks)

    def detect(self, image):
        return [self.face] if image.mean() > 5 else []


def test_pack_aligns_unaligned_images_with_a_detector(tmp_path):
    from lvface_mm.data import detecting_encoder
    from lvface_mm.faces.alignment import align_face
    from lvface_mm.models.pretrained import ARCFACE_TEMPLATE_112

    landmarks = np.asarray(ARCFACE_TEMPLATE_112) * 1.2 + 10
    src = tmp_path / "src" / "person"
    src.mkdir(parents=True)
    photo = pattern_image(5, size=160)
    (src / "a.png").write_bytes(png_bytes(photo))
    (src / "black.png").write_bytes(png_bytes(np.zeros((160, 160, 3), np.uint8)))
    result = pack_identity_folder(tmp_path / "src", tmp_path / "out", detecting_encoder(_FixedLandmarks(landmarks)),
                                  progress=False)
    assert result.num_images == 1
    assert result.skipped == ((str(src / "black.png"), "no face detected"),)
    got, _ = RecordDataset(tmp_path / "out").read_image(0)
    expected = align_face(photo, landmarks)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 3  # equal up to JPEG q95


def test_pack_cli(tmp_path, capsys):
    src = write_identity_tree(tmp_path / "src", identities=2, per_identity=2)
    (src / "id_01" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["pack", str(src), str(tmp_path / "out"), "--aligned", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "4 images, 2 identities" in out.out
    assert "broken.jpg: not a readable image" in out.err
    before = (tmp_path / "out" / "train.rec").read_bytes()
    # A second run must not clobber the first one.
    assert main(["pack", str(src), str(tmp_path / "out"), "--aligned", "--quiet"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "train.rec").read_bytes() == before
    assert main(["pack", str(src), str(tmp_path / "plain"), "--aligned", "--plain", "--quiet"]) == 0
    assert RecordDataset(tmp_path / "plain").layout.kind == "plain"
    assert main(["pack", str(tmp_path / "missing"), str(tmp_path / "o2"), "--aligned"]) == 2
    assert "identity folder not found" in capsys.readouterr().err
    assert main(["pack", str(src), str(tmp_path / "o3"), "--detector", "no-such-detector", "--quiet"]) == 2
    assert "unknown detector 'no-such-detector'" in capsys.readouterr().err


def test_pack_cli_detects_and_aligns_real_photos(tmp_path, data_dir):
    pytest.importorskip("dlib")
    import shutil
    from pathlib import Path

    for name in ("obama", "biden"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        shutil.copy(Path(data_dir) / "portraits" / f"{name}.jpg", tmp_path / "photos" / name / "1.jpg")
    assert main(["pack", str(tmp_path / "photos"), str(tmp_path / "out"), "--quiet", "--workers", "1"]) == 0
    ds = RecordDataset(tmp_path / "out")
    assert len(ds) == 2 and ds.num_classes == 2
    crop, label = ds.read_image(1)
    assert crop.shape == (112, 112, 3) and label == 1
    assert crop.std() > 20  # a real face crop, not the black border of a failed warp
