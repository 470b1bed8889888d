"""One dtype table and parser (`lvface_mm.models.inference`), and the bf16 decision of
`FaceEmbedder(backend="auto")`: bf16 only where the CPU multiplies it natively and only if the
measured accuracy decision says yes."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from lvface_mm.cli import build_parser
from lvface_mm.faces import FaceEmbedder
from lvface_mm.models import DTYPE_NAMES, inference, resolve_dtype
from lvface_mm.models.inference import (
    BF16_AUTO_MEASURED,
    auto_uses_bf16,
    bf16_auto_decision,
    cpu_has_native_bf16,
)

pytestmark = pytest.mark.usefixtures("single_thread")
PACKAGE = Path(__file__).resolve().parent.parent / "lvface_mm"


def test_every_name_in_the_table_resolves_and_bad_names_are_refused():
    for name, dtype in DTYPE_NAMES.items():
        assert resolve_dtype(name) is dtype
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype(torch.int32)


def test_command_line_dtype_choices_are_table_names():
    choices, stack = set(), [build_parser()]
    while stack:
        for action in stack.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += list(action.choices.values())
            elif action.dest == "dtype" and action.choices:
                choices |= set(action.choices)
    assert {"fp32", "bf16", "float32", "bfloat16"} <= choices  # embed's and eval's --dtype
    assert choices <= set(DTYPE_NAMES), choices - set(DTYPE_NAMES)


def test_embedder_takes_any_table_name():
    assert FaceEmbedder.from_tiny(dtype="bfloat16", backend="torch").dtype is torch.bfloat16
    assert FaceEmbedder.from_tiny(dtype="bf16", backend="torch").dtype is torch.bfloat16
    assert FaceEmbedder.from_tiny(dtype="half", backend="torch").dtype is torch.float16


def test_no_second_dtype_table_in_the_library():
    """No dict literal outside models/inference.py maps precision names to torch dtypes."""
    names = {"bf16", "fp16", "fp32", "bfloat16", "float16", "float32"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() == "models/inference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in names for k in node.keys):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and isinstance(node.args[0], ast.Name) and node.args[0].id == "torch"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} getattr(torch, ...)")
    assert offenders == []


# -- the bf16 decision --------------------------------------------------------------------------------


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16({"avx2", "fma3", "avx512_bf16"})
    assert cpu_has_native_bf16({"amx_bf16", "amx_tile"})
    assert not cpu_has_native_bf16({"avx2", "fma3", "avx512f"})
    assert not cpu_has_native_bf16(set())


def test_auto_picks_bf16_only_with_the_flag_and_a_yes():
    assert auto_uses_bf16({"avx512_bf16"}, decision=True)
    assert auto_uses_bf16({"amx_bf16"}, decision=True)
    assert not auto_uses_bf16({"avx2", "avx512f"}, decision=True)  # no native bf16: never
    assert not auto_uses_bf16({"avx512_bf16", "amx_bf16"}, decision=False)  # measured "no": never
    assert auto_uses_bf16({"avx512_bf16"}) is BF16_AUTO_MEASURED  # the default is the recorded decision


def test_decision_rule_needs_cosine_and_accuracy():
    assert bf16_auto_decision(cos_min=0.9995, acc_fp32=0.95, acc_bf16=0.95)
    assert not bf16_auto_decision(cos_min=0.998, acc_fp32=0.95, acc_bf16=0.95)
    assert not bf16_auto_decision(cos_min=0.9999, acc_fp32=0.95, acc_bf16=0.945)


@pytest.mark.parametrize(("flags", "decision", "expect_bf16"), [
    ({"avx2", "avx512_bf16"}, True, True),
    ({"avx2", "avx512_bf16"}, False, False),
    ({"avx2"}, True, False),
])
def test_embedder_auto_backend_follows_the_decision(monkeypatch, flags, decision, expect_bf16):
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(inference, "BF16_AUTO_MEASURED", decision)
    # Keep the fp32 alternative in PyTorch: the ONNX export is not what this test is about.
    monkeypatch.setattr("lvface_mm.faces.embedder._onnx_is_faster", lambda encoder: False)
    embedder = FaceEmbedder.from_tiny(device="cpu")
    assert embedder.dtype is (torch.bfloat16 if expect_bf16 else torch.float32)
    # An explicit dtype or backend is never overridden.
    assert FaceEmbedder.from_tiny(device="cpu", dtype="fp32").dtype is torch.float32
    assert FaceEmbedder.from_tiny(device="cpu", backend="torch").dtype is torch.float32
