"""Face data on disk: RecordIO training sets (no mxnet), folder-per-identity trees, verification
`.bin` files, the IJB-B/C protocol layout, and synthetic identities."""

from .ijb import IJB_TARGETS, IJBAlignedFaces, IJBProtocol, TemplateSet, load_ijb, resolve_ijb_dir
from .image_folder import IdentityFolder, list_identity_folder
from .pack import PackResult, aligned_encoder, detecting_encoder, pack_identity_folder
from .record_dataset import RecordDataset, RecordLayout, decode_image, read_layout
from .recordio import (
    RECORD_MAGIC,
    HeaderTable,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    encode_record,
    pack,
    read_index,
    resolve_record_paths,
    unpack,
)
from .verification_bin import (
    UnsafePickleError,
    VerificationBin,
    load_verification_bin,
    safe_load_pickle,
    write_verification_bin,
)

__all__ = [
    "IJB_TARGETS",
    "RECORD_MAGIC",
    "HeaderTable",
    "IJBAlignedFaces",
    "IJBProtocol",
    "IRHeader",
    "IdentityFolder",
    "PackResult",
    "RecordDataset",
    "RecordIOError",
    "RecordLayout",
    "RecordReader",
    "RecordWriter",
    "TemplateSet",
    "UnsafePickleError",
    "VerificationBin",
    "aligned_encoder",
    "decode_image",
    "detecting_encoder",
    "encode_record",
    "list_identity_folder",
    "load_ijb",
    "load_verification_bin",
    "pack",
    "pack_identity_folder",
    "read_index",
    "read_layout",
    "resolve_ijb_dir",
    "resolve_record_paths",
    "safe_load_pickle",
    "unpack",
    "write_verification_bin",
]

# Synthetic identities (tests, smoke runs, demos) live in their own module.
from . import synthetic  # noqa: E402
from .synthetic import SyntheticFaces, SyntheticFacesConfig  # noqa: E402

__all__ += ["SyntheticFaces", "SyntheticFacesConfig", "synthetic"]
