"""How both training programs start: one command line, one process group, one device choice.

    python -m training.encoder --config training/configs/encoder/tiny_synthetic.yaml --optim.lr=5e-4
    torchrun --nproc_per_node=8 -m training.adapter --config training/configs/adapter/llava15_7b.yaml
    accelerate launch --num_processes 8 --mixed_precision bf16 -m training.encoder --config ...

Command line (both programs): `--config PATH` (optional: the config class's defaults otherwise),
then any config field as `--section.key=value` or `--section.key value`; `-h`/`--help` prints the
program's description and every config key with its type and default. A config mistake ends the
program before anything starts, with `config error: <file or command line>: <what is wrong>`.

Processes (both programs): `torchrun` and `accelerate launch` both describe the process group in
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). `setup_distributed` joins it with
`torch.distributed` (NCCL on GPUs, gloo on CPUs), each process on `cuda:LOCAL_RANK` or the CPU;
one process without those variables. `accelerate launch --mixed_precision bf16|fp16` turns on
autocast when the config leaves `loop.precision: fp32` (`launcher_precision`). Nothing here runs at import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lvface_mm.distributed import is_distributed

from .config import ConfigError, LoopConfig, describe_type, load_config, to_dict

T = TypeVar("T")


@dataclass(frozen=True)
class ProgramArgs:
    """A training program's command line: the YAML file, the dotted overrides, and whether help was asked."""

    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    help: bool = False


def parse_program_args(argv: Sequence[str]) -> ProgramArgs:
    """`["--config", "x.yaml", "--optim.lr=1e-3"]` -> ProgramArgs("x.yaml", ("--optim.lr=1e-3",)).

    Raises:
        ConfigError: `--config` without a path, or given twice.
    """
    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        return ProgramArgs(help=True)
    paths: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError("command line: --config needs a YAML path (--config PATH)")
            paths.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if len(paths) > 1:
        raise ConfigError(f"command line: --config given {len(paths)} times ({', '.join(paths)}); give one file "
                          "(a file can start from another with `base: other.yaml`)")
    if paths and not paths[0]:
        raise ConfigError("command line: --config needs a YAML path (--config PATH)")
    return ProgramArgs(paths[0] if paths else None, tuple(rest))


def config_keys(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per config key of `cls`: `--optim.lr  a number (default 0.001)` (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults  # nested sections: the parent's default value
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]) and dataclasses.is_dataclass(value):
            lines += config_keys(type(value), f"{prefix}{f.name}.", value)
        else:
            shown = json.dumps(to_dict(value), default=str)  # YAML spelling: null, false, [1, 2]
            lines.append(f"  --{prefix}{f.name}  {describe_type(hints[f.name])} (default {shown})")
    return lines


def setup_distributed() -> torch.device:
    """Join the process group torchrun / accelerate launch describe (once; a second call only
    returns the device); one process without them. Returns this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@contextlib.contextmanager
def process_group() -> Iterator[torch.device]:
    """`setup_distributed` for the length of a run; a group started here is destroyed at the end
    (after a garbage collection frees DDP wrappers, which otherwise abort gloo at exit). Nested
    uses and callers that started their own group keep it."""
    created = not is_distributed()
    device = setup_distributed()
    try:
        yield device
    finally:
        if created and is_distributed():
            gc.collect()
            dist.destroy_process_group()


def launcher_precision(loop: LoopConfig) -> LoopConfig:
    """`accelerate launch --mixed_precision bf16|fp16` sets autocast when the config leaves fp32."""
    requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if loop.precision == "fp32" and requested in ("bf16", "fp16"):
        return dataclasses.replace(loop, precision=requested)
    return loop


def run_program(
    cls: type[T], train: Callable[[T], Any], argv: Sequence[str], description: str | None
) -> tuple[int, Any]:
    """Parse `argv`, load the `cls` config, run `train(config)` inside `process_group()`.

    Returns:
        (exit status, what `train` returned); (0, None) after printing help.

    Raises:
        SystemExit: `config error: ...` for any command-line or config mistake, before `train` runs.
    """
    try:
        args = parse_program_args(argv)
        if args.help:
            print((description or "").rstrip() + "\n\nConfig keys (--key=value):\n" + "\n".join(config_keys(cls)))
            return 0, None
        config = load_config(cls, args.config_path, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    with process_group():
        return 0, train(config)


__all__ = [
    "ProgramArgs",
    "config_keys",
    "launcher_precision",
    "parse_program_args",
    "process_group",
    "run_program",
    "setup_distributed",
]
