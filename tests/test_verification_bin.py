"""Verification .bin: restricted unpickling, Python-2 pickles, lazy decode, writer round trip."""

from __future__ import annotations

import copyreg
import pickle
import struct

import numpy as np
import pytest

from lvface_mm.data import UnsafePickleError, VerificationBin, load_verification_bin, write_verification_bin
from tests._datasets_and_eval_fixtures import jpeg_bytes, pattern_image, png_bytes


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """The opcodes Python 2's cPickle (protocol 2) writes for (list of str, list of bool)."""
    out = bytearray(pickle.PROTO + b"\x02")
    out += pickle.EMPTY_LIST + pickle.MARK
    for data in images:
        if len(data) < 256:
            out += pickle.SHORT_BINSTRING + bytes([len(data)]) + data
        else:
            out += pickle.BINSTRING + struct.pack("<i", len(data)) + data
    out += pickle.APPENDS
    out += pickle.EMPTY_LIST + pickle.MARK
    for v in issame:
        out += pickle.NEWTRUE if v else pickle.NEWFALSE
    out += pickle.APPENDS + pickle.TUPLE2 + pickle.STOP
    return bytes(out)


def test_python2_pickle_loads_as_bytes(tmp_path):
    images = [jpeg_bytes(pattern_image(i)) for i in range(4)]
    assert all(len(b) > 255 for b in images)  # exercises BINSTRING; the names below use SHORT_BINSTRING
    data = _py2_pickle(images, [True, False])
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what a plain Python 3 load does with Python-2 str of JPEG bytes
    path = tmp_path / "lfw.bin"
    path.write_bytes(data)
    vb = load_verification_bin(path)
    assert vb.name == "lfw" and vb.num_pairs == 2 and len(vb) == 4
    assert vb.images == images  # still encoded: decoding is lazy
    np.testing.assert_array_equal(vb.issame, [True, False])
    img = vb[3]
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - pattern_image(3).astype(int)).mean() < 3  # JPEG q95


def test_writer_round_trip_from_paths_and_bytes(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.png"
    a.write_bytes(jpeg_bytes(pattern_image(1)))
    b.write_bytes(png_bytes(pattern_image(2)))
    big = jpeg_bytes(pattern_image(3, size=150))  # not 112: the reader resizes, as InsightFace does
    out = write_verification_bin(tmp_path / "set.bin", [(a, b, True), (big, a, False), (str(b), b, 1)])
    vb = load_verification_bin(out)
    assert vb.num_pairs == 3
    np.testing.assert_array_equal(vb.issame, [True, False, True])
    assert vb.images[0] == a.read_bytes() and vb.images[2] == big
    np.testing.assert_array_equal(vb[1], pattern_image(2))  # PNG: lossless
    assert vb[2].shape == (112, 112, 3)
    # Plain pickle reads it too (protocol 4 needs no globals): the file is a standard .bin.
    images, issame = pickle.loads(out.read_bytes())
    assert len(images) == 6 and issame == [True, False, True]
    with pytest.raises(FileExistsError):
        write_verification_bin(out, [(a, b, True)])
    with pytest.raises(FileNotFoundError, match="pair 0: image file not found"):
        write_verification_bin(tmp_path / "x.bin", [(tmp_path / "nope.jpg", b, True)])


class _RunsCode:
    """Pickles into 'call exec(source)' — what a malicious .bin would contain."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = _RunsCode(f"open({str(marker)!r}, 'w').write('ran')")
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload, b"x"], [True]), protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"evil\.bin: refusing to load.*(__builtin__|builtins)\.exec"):
        load_verification_bin(path)
    assert not marker.exists()
    # Control: an unrestricted load of the same file does run the code, so the test can fail.
    pickle.loads(path.read_bytes())
    assert marker.read_text() == "ran"


def test_extension_registry_opcode_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    copyreg.add_extension("builtins", "exec", 0x7E)
    try:
        data = pickle.PROTO + b"\x02" + pickle.EXT1 + b"\x7e" + pickle.BINUNICODE
        source = f"open({str(marker)!r}, 'w').write('ran')".encode()
        data += struct.pack("<I", len(source)) + source + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
        path = tmp_path / "ext.bin"
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError):
            load_verification_bin(path)
    finally:
        copyreg.remove_extension("builtins", "exec", 0x7E)
    assert not marker.exists()


def test_numpy_arrays_and_wrong_shapes_are_refused(tmp_path):
    arr = tmp_path / "arr.bin"
    arr.write_bytes(pickle.dumps(([np.zeros(3, np.uint8), np.zeros(3, np.uint8)], [True])))
    with pytest.raises(UnsafePickleError, match="numpy"):
        load_verification_bin(arr)
    cases = {
        "dict.bin": ({"images": []}, "expected a pickled \\(images, issame_list\\) pair, got dict"),
        "count.bin": (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        "labels.bin": (([b"a", b"b"], ["yes"]), "must hold booleans, found 'yes'"),
        "strings.bin": ((["a", "b"], [True]), "list of encoded image bytes, got list\\[2\\] of str"),
    }
    for name, (obj, message) in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=message):
            load_verification_bin(tmp_path / name)
    (tmp_path / "junk.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable verification \.bin pickle"):
        load_verification_bin(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError):
        load_verification_bin(tmp_path / "missing.bin")


def test_lazy_set_decodes_on_access_only():
    images = [jpeg_bytes(pattern_image(i)) for i in range(2)] + [b"corrupt", b"also corrupt"]
    vb = VerificationBin(images, [True, False], name="mix")
    assert vb[0].shape == (112, 112, 3)  # the corrupt images do not matter until they are read
    with pytest.raises(ValueError, match="mix image 2: 7 bytes are not a decodable image"):
        vb[2]
    assert vb.encoded_bytes == sum(len(b) for b in images)
