"""Identity-grounded VQA: the sample format, the dataset builder, metrics and the evaluation harness.

    schema    LLaVA-style conversation samples that list their faces; validation with clear errors
    builder   training / evaluation sets from identity-labelled faces, split by identity and photo
    sources   face sources for the builder (folder per identity, RecordIO, synthetic, embeddings)
    binding   open-set samples: names per sample, the gallery's candidates as references
    scenes    procedural pictures of people holding objects: identity + picture questions
    rendering samples in the one prompt format (the API's), with their picture, per family
    data      the faces (embedding-table rows or crops) as encoder inputs
    metrics   recognition, naming, caption precision/recall/F1, hallucination, abstention, QA
    harness   plain / prompt / Set-of-Mark / token / token + prompt, in one report
    report    JSON + markdown + plot
    retention text-only questions, trained model against its base (LoRA off)
    testing   a tiny random LLM whose vocabulary covers a VQA set

`data`, `rendering`, `harness`, `retention`, `scenes` and `testing` need torch and the `vlm` extra and are
imported from their modules.
"""

from .builder import FacePhoto, VQABuildConfig, build_vqa, check_splits, load_manifest, split_photos
from .metrics import NameMatcher, score_predictions
from .report import markdown_table, write_report
from .schema import Face, Sample, Turn, VQAValidationError, check_files, dump_samples, load_samples, validate_samples

__all__ = [
    "Face",
    "FacePhoto",
    "NameMatcher",
    "Sample",
    "Turn",
    "VQABuildConfig",
    "VQAValidationError",
    "build_vqa",
    "check_files",
    "check_splits",
    "dump_samples",
    "load_manifest",
    "load_samples",
    "markdown_table",
    "score_predictions",
    "split_photos",
    "validate_samples",
    "write_report",
]
