"""Typed run configs: YAML files and dotted command-line overrides -> frozen dataclasses.

A run config is a tree of small frozen dataclasses (one per concern). The sections every training
program shares live here (`OptimConfig`, `LoopConfig`, `CheckpointConfig`); each program defines
its own sections and run config at the top of its module (`training.encoder.EncoderRunConfig`,
`training.adapter.AdapterRunConfig`). `load_config(EncoderRunConfig, "x.yaml", ["--optim.lr=1e-3"])`
reads the file, applies the overrides and builds the tree. Mistakes fail loudly and name the place:

    - an unknown key names the key, the file (or "command line") and the keys that do exist;
    - a value of the wrong type names the key, the file, the value and the expected type;
    - a value a dataclass rejects in `__post_init__` names the section and the file.

A YAML file may start from another with `base: other.yaml` (relative to the file); mappings merge
key by key, everything else (lists included) replaces. The fully resolved config is written to
the run directory so a run can always be reproduced from its own folder.

Checking keys and types is pydantic's job (`pydantic>=2.5`, validating the plain dataclasses
as they are, `__post_init__` checks included); this module adds what pydantic does not know: YAML
files with `base:`, which file or command-line flag set each key, "did you mean" for unknown
keys, and messages in a config file's words. Values are read the lax way (`3` for a float,
`1e-3` that PyYAML leaves as text, `"3"` for an integer). OmegaConf structured configs cannot
express the `Literal` fields or `tuple[int | None, int | None] | None`; docs/training.md compares.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

BASE_KEY = "base"  # reserved top-level YAML key: the file this one starts from


class ConfigError(ValueError):
    """A run config could not be built; the message names the key, its source and the problem."""


# -- generic sections (any task) ------------------------------------------------------------------
@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and polynomial decay, both counted in optimizer steps.

    Args:
        lr: peak learning rate (reached at the end of warm-up).
        weight_decay: AdamW's decoupled weight decay.
        betas, eps: AdamW's moment coefficients and epsilon.
        warmup_epochs: warm-up length in epochs (fractions allowed); ignored if `warmup_steps` is set.
        warmup_steps: warm-up length in optimizer steps.
        decay_power: exponent of the decay after warm-up (1 = linear, as arcface_torch).
        min_lr_ratio: the learning rate decays to `lr * min_lr_ratio` at the last step.
        exclude_norm_bias_from_decay: no weight decay on 1-d parameters (norms, biases) and on the
            model's `no_weight_decay()` names. arcface_torch decays everything (False).
        clip_grad_norm: max global norm of the replicated (data-parallel) parameters' gradients;
            sharded parameters (Partial FC centres) are not clipped, as in arcface_torch. None = off.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    decay_power: float = 1.0
    min_lr_ratio: float = 0.0
    exclude_norm_bias_from_decay: bool = False
    clip_grad_norm: float | None = 5.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        _check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.warmup_steps is None or self.warmup_steps >= 0,
               f"warmup_steps must be >= 0 or null, got {self.warmup_steps}")
        _check(self.decay_power > 0, f"decay_power must be > 0, got {self.decay_power}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0,
               f"clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


@dataclass(frozen=True)
class LoopConfig:
    """How long and how the one training loop runs.

    Args:
        epochs: passes over the training set; the schedule length is epochs x optimizer steps per epoch.
        max_steps: schedule length in optimizer steps instead of `epochs` (smoke runs, benchmarks).
        stop_at_step: stop after this optimizer step, leaving the schedule as it is; a later run
            with `checkpoint.resume=auto` continues exactly (time-limited cluster slots).
        grad_accum_steps: micro-batches per optimizer step; the loss is divided by it, DDP syncs
            only on the last micro-batch, and the schedule counts optimizer steps.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast + gradient scaler, saved in checkpoints).
        seed: base seed; rank r seeds its generators with seed + r.
        log_every: optimizer steps between log lines (JSONL, TensorBoard, progress bar).
        tensorboard: write TensorBoard events next to the JSONL log (rank 0).
        progress_bar: show a tqdm bar on rank 0.
        find_unused_parameters: passed to DDP, for tasks whose forward skips some parameters.
    """

    epochs: int = 1
    max_steps: int | None = None
    stop_at_step: int | None = None
    grad_accum_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or null, got {self.max_steps}")
        _check(self.stop_at_step is None or self.stop_at_step >= 1,
               f"stop_at_step must be >= 1 or null, got {self.stop_at_step}")
        _check(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and whether a run resumes.

    Args:
        every_steps: optimizer steps between checkpoints (0 = only at epoch ends and at the end).
        at_epoch_end: also write one at the end of every epoch.
        keep_last: newest checkpoints kept; older ones are deleted after a newer one is safely written.
        resume: "auto" continues from the newest checkpoint in the run directory if there is one;
            "never" refuses to start in a directory that already holds checkpoints (nothing saved
            is ever overwritten); any other value is the path of a checkpoint to start from.
        format: "sharded" (a `step_N/` directory written with torch.distributed.checkpoint, every
            rank saving its own class-centre rows), "single_file" (`step_N.pt` from rank 0, rows
            gathered) or "auto": sharded for tasks with row-sharded modules (encoder training),
            single file otherwise (adapter training). Both resume on any number of processes;
            either format is read.
    """

    every_steps: int = 1000
    at_epoch_end: bool = True
    keep_last: int = 3
    resume: str = "auto"
    format: Literal["auto", "sharded", "single_file"] = "auto"

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        _check(bool(self.resume), "resume must be 'auto', 'never' or a checkpoint path")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# -- loading ------------------------------------------------------------------------------------------
class _Sources:
    """Which file (or the command line) set each dotted key, for error messages."""

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}

    def record(self, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
        for key, value in data.items():
            self._by_key[prefix + str(key)] = source
            if isinstance(value, Mapping):
                self.record(value, source, f"{prefix}{key}.")

    def within(self, prefix: str) -> str:
        """Every source that set a key of section `prefix` (for errors about the whole section)."""
        found = sorted({src for key, src in self._by_key.items() if key == prefix or key.startswith(prefix + ".")})
        return ", ".join(found) if found else self.of(prefix)

    def of(self, key: str) -> str:
        key = key.split("[")[0]  # "head.stage_override_steps[1]" was set with its list
        probe = key
        while probe:
            if probe in self._by_key:
                return self._by_key[probe]
            probe = probe.rpartition(".")[0]
        below = sorted({src for k, src in self._by_key.items() if k.startswith(key + ".")})  # --x.y names x
        return ", ".join(below) if below else "defaults"


def read_yaml(path: str | Path, sources: _Sources | None = None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML config, following `base:` links; returns the merged mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: 'base' links form a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    base = data.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
        merged = read_yaml(path.parent / base, sources, (*_seen, path.resolve()))
    if sources is not None:
        sources.record(data, str(path))
    return _merge(merged, data)


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """`["--optim.lr=1e-3", "--loop.epochs", "3"]` -> {"optim.lr": "1e-3", "loop.epochs": "3"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --section.key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value (--{key}=VALUE)")
            value = args[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, str] = ()) -> T:
    """Build `cls` (a dataclass) from a YAML file and dotted overrides.

    Args:
        cls: the run-config dataclass, e.g. `EncoderRunConfig`.
        path: YAML file; None starts from the dataclass defaults.
        overrides: `["--optim.lr=1e-3", ...]` or {"optim.lr": "1e-3"}; values are parsed as YAML
            unless the field takes a string (`--output_dir=123` stays "123").

    Raises:
        ConfigError: unknown key, wrong type or invalid value, naming the key and where it came from.
    """
    sources = _Sources()
    data = read_yaml(path, sources) if path is not None else {}
    items = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(list(overrides)).items()
    for dotted, text in items:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_cli(text, _annotation_at(cls, parts))
        sources.record({dotted: None}, f"command line (--{dotted})")
    return build(cls, data, sources)


def build(cls: type[T], data: Mapping[str, Any], sources: _Sources | None = None) -> T:
    """Build dataclass `cls` from a mapping with pydantic, which checks every key and type and runs
    the dataclasses' own `__post_init__` checks; its errors are reworded to name the key and its source."""
    from pydantic import ValidationError

    sources = sources or _Sources()
    try:
        return _validator(cls).model_validate({"run": data}).run
    except ValidationError as exc:
        lines = [_explain(cls, {**err, "loc": err["loc"][1:]}, sources) for err in exc.errors()]  # loc[0]: "run"
        raise ConfigError("\n".join(lines)) from None
    except TypeError as exc:  # a __post_init__ that raises TypeError instead of ValueError
        raise ConfigError(f"{sources.within('')}: invalid {cls.__name__!r}: {exc}") from None


@functools.cache
def _validator(cls: type) -> Any:
    """A one-field pydantic model around `cls`: its `extra="forbid"` reaches every nested dataclass
    (pydantic hands a model's config down to the stdlib dataclasses in it), so unknown keys fail."""
    from pydantic import ConfigDict, create_model

    return create_model(f"{cls.__name__}Validator", __config__=ConfigDict(extra="forbid"), run=(cls, ...))


# -- error messages: pydantic reports (type, location, input); we say which key, which file, what was expected
def _explain(cls: type, err: Mapping[str, Any], sources: _Sources) -> str:
    loc: tuple[str | int, ...] = err["loc"]
    kind, value = err["type"], err["input"]
    if kind == "unexpected_keyword_argument":
        return _unknown_key(cls, loc, sources)
    if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), Exception):
        # A dataclass's __post_init__ rejected the section at `loc` as a whole.
        section = _dotted(loc)
        origin = sources.within(section) if section else "config"
        return f"{origin}: invalid {section or cls.__name__!r}: {err['ctx']['error']}"
    if kind == "missing" and loc and typing.get_origin(_annotation_at(cls, loc[:-1])) is tuple:
        loc = loc[:-1]  # a fixed-length list with an item too few: the list is wrong, not item [i]
    tp = _annotation_at(cls, loc)
    key = _dotted(loc)
    expected = describe_type(tp) if tp is not None else err["msg"].removeprefix("Input should be ")
    return f"{sources.of(key)}: {key} must be {expected}, got {str(value)!r}"


def _unknown_key(cls: type, loc: tuple[str | int, ...], sources: _Sources) -> str:
    owner = _annotation_at(cls, loc[:-1])
    names = [f.name for f in dataclasses.fields(owner) if f.init] if dataclasses.is_dataclass(owner) else []
    prefix, key = _dotted(loc[:-1]), _dotted(loc)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    section = f"'{prefix}'" if prefix else "the top level"
    return f"{sources.of(key)}: unknown key {key!r}{hint}; keys allowed in {section}: {', '.join(names)}"


def _dotted(loc: Sequence[str | int]) -> str:
    """('optim', 'betas', 1) -> 'optim.betas[1]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _annotation_at(cls: type, loc: Sequence[str | int]) -> Any:
    """The declared type at a key path of a config class (None for a key it does not declare)."""
    tp: Any = cls
    for part in loc:
        tp = _without_none(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and isinstance(part, str):
            tp = typing.get_type_hints(tp).get(part) if part in {f.name for f in dataclasses.fields(tp)} else None
        elif origin is tuple and isinstance(part, int):
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else (args[part] if part < len(args) else None)
        elif origin is dict or tp is dict:
            tp = args[1] if args else Any
        elif tp is Any:
            return Any
        else:
            return None
        if tp is None:
            return None
    return tp


def _without_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def describe_type(tp: Any) -> str:
    """What a value of annotation `tp` looks like, in a config file's words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a list" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} items"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _parse_cli(text: str, tp: Any) -> Any:
    """A command-line value: YAML, unless the field takes a string (then as typed; `null` for optional ones)."""
    import yaml

    takes_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
    if takes_str:
        nullable = type(None) in typing.get_args(tp)
        return None if nullable and text.strip().lower() in ("null", "none", "~") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# -- writing ---------------------------------------------------------------------------------------
def to_dict(config: Any) -> dict[str, Any]:
    """A config tree as plain YAML-safe data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a crash never leaves half a file)."""
    import yaml

    from .checkpoint import atomic_write_bytes

    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "LoopConfig",
    "OptimConfig",
    "build",
    "describe_type",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "save_config",
    "to_dict",
]
