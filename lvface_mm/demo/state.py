"""What the demo's handlers share: the workbench, what could not load, and the settings that decide
concurrency and how long uploads live. No gradio here, so it is testable without a browser.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..gallery.workbench import PartUnavailable, Workbench, WorkbenchConfig

__all__ = ["PARTS", "DemoSettings", "DemoState", "DemoWorkbench", "clean_message"]

log = logging.getLogger("lvface_mm.demo")

# Which tabs each part serves, for the notice at the top of the page.
PARTS: dict[str, str] = {
    "face encoder": "every tab (enrol, naming faces, search)",
    "CLIP": "indexing photos and text search",
    "VLM": "Caption and Ask (faces are still named)",
}


@dataclass(frozen=True)
class DemoSettings:
    """How the demo serves requests.

    Attributes:
        read_concurrency: requests that only read (naming the faces of an upload, searching) served
            at once; writes (enrol, index, rename, delete, switching models) and VLM answers run one
            at a time each.
        max_queue: requests waiting beyond that; more get "queue is full".
        cache_age_s: uploads and result images older than this are deleted from the server...
        cache_every_s: ...by a sweep that runs this often.
        keep_uploads: the default of the "keep copies of indexed photos" box.
    """

    read_concurrency: int = 4
    max_queue: int = 512
    cache_age_s: int = 1800
    cache_every_s: int = 300
    keep_uploads: bool = False

    def __post_init__(self) -> None:
        for name in ("read_concurrency", "max_queue", "cache_age_s", "cache_every_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DemoSettings.{name}={value!r}: expected a positive integer")

    @property
    def upload_lifetime_minutes(self) -> int:
        """The longest an upload can stay on the server: its age limit plus one sweep interval."""
        return -(-(self.cache_age_s + self.cache_every_s) // 60)


class _OneAtATime:
    """Calls into the wrapped object hold a lock: the face pipeline (dlib detector, per-stage timers)
    is not documented as thread-safe, while CLIP and the SQLite readers are."""

    def __init__(self, target: Any, lock: threading.Lock) -> None:
        self._target, self._lock = target, lock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return locked


class DemoWorkbench(Workbench):
    """A Workbench whose parts fail soft on any load error (a corrupt or wrong-variant checkpoint, a
    bad CLIP file), not only on missing weights, and whose face pipeline is used by one thread at a time."""

    def __init__(self, config: WorkbenchConfig, unavailable: dict[str, str] | None = None) -> None:
        super().__init__(config)
        self._face_lock = threading.Lock()
        self._errors.update(unavailable or {})  # parts known missing before any load (offline check)

    @property
    def embedder(self) -> Any:
        return _OneAtATime(Workbench.embedder.fget(self), self._face_lock)

    def _load(self, part: str, make: Any) -> Any:
        try:
            return super()._load(part, make)
        except PartUnavailable:
            raise
        except Exception as exc:  # corrupt file, wrong architecture, unpickling error: a message, not a crash
            log.debug("%s failed to load", part, exc_info=True)  # the details, for --debug logging only
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._errors[part] = f"{part} unavailable: {first[:400]}"
            raise PartUnavailable(self._errors[part]) from exc

    def unavailable(self) -> dict[str, str]:
        """part -> why it cannot load, for the parts that failed so far."""
        return dict(self._errors)


class DemoState:
    """The one workbench all users share, swapped atomically when someone picks other models.

    A gallery file that cannot be opened with this encoder (made by another one, or not a gallery)
    does not stop the start: `fatal` then says why, and every action answers with it."""

    def __init__(self, config: WorkbenchConfig | None = None, workbench: Workbench | None = None, *,
                 settings: DemoSettings | None = None, unavailable: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._cleanups: list[Callable[[], None]] = []
        self.settings = settings or DemoSettings()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.fatal: str | None = None
        self.workbench: Workbench | None = workbench
        if workbench is None:
            config = config or WorkbenchConfig()
            try:
                self.workbench = DemoWorkbench(config, unavailable)
            except ValueError as exc:  # the gallery file: another encoder's, or not a gallery
                self.fatal = (f"The database cannot be used: {exc}. Start the demo with the encoder that made it "
                              f"(--model), or with another --db file.")
                self._config = config
        cfg = self.config
        self.base_db = Path(cfg.db)
        self._first_model = cfg.face_model

    @property
    def config(self) -> WorkbenchConfig:
        return self.workbench.config if self.workbench is not None else self._config

    def current(self) -> Workbench:
        """The workbench, or the start-up problem as an error the handlers turn into a message."""
        if self.workbench is None:
            raise PartUnavailable(self.fatal or "the demo has no workbench")
        return self.workbench

    def switch(self, face_model: str, vlm: str) -> Workbench:
        with self._lock:
            old = self.current()
            cfg = old.config
            chosen = None if not vlm or vlm.strip().lower() == "none" else vlm.strip()
            if cfg.tiny or (face_model == cfg.face_model and chosen == cfg.vlm):
                return old
            # Embeddings of different encoders do not compare: each variant gets its own gallery file.
            db = self.base_db if face_model == self._first_model else self.base_db.with_suffix(f".{face_model}.db")
            self.workbench = DemoWorkbench(replace(cfg, face_model=face_model, vlm=chosen, db=str(db)))
            old.close()
            return self.workbench

    def problems(self) -> dict[str, str]:
        """part -> reason for every part that is known not to work (empty when all is well so far)."""
        if self.workbench is None:
            return {"database": self.fatal or ""}
        errors = getattr(self.workbench, "unavailable", lambda: {})()
        if self.workbench.config.vlm is None and not self.workbench.config.tiny:
            errors.setdefault("VLM", "VLM disabled (--vlm none)")
        return errors

    def notice(self) -> str:
        """Markdown for the top of the page: what is missing and which tabs still work ('' if none)."""
        problems = self.problems()
        if not problems:
            return ""
        if "database" in problems:
            return f"**Nothing works yet.** {clean_message(problems['database'])}"
        lines = ["**Some features are off on this server:**"]
        for part, why in problems.items():
            lines.append(f"- **{part}** — {PARTS.get(part, part)} unavailable: {clean_message(_short(why))}")
        working = [t for t, needs in (("Enrol", "face encoder"), ("Caption & ask", "face encoder"),
                                      ("Search photos", "face encoder")) if needs not in problems]
        if working:
            extra = "" if "VLM" not in problems else " (Caption & ask names faces but gives no answers)"
            lines.append(f"Working tabs: {', '.join(working)}{extra}.")
        else:
            lines.append("No tab works until the face encoder loads.")
        return "\n".join(lines)

    def status_lines(self) -> list[str]:
        if self.workbench is None:
            return [clean_message(self.fatal or "")]
        return [clean_message(line) for line in self.workbench.status()]

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run `fn` on `close()` (the launcher's cache folder and environment)."""
        self._cleanups.append(fn)

    def close(self) -> None:
        if self.workbench is not None:
            self.workbench.close()
        while self._cleanups:
            self._cleanups.pop()()


def _short(why: str) -> str:
    """The first line of a loader message, plus its `hf download` line when it has one."""
    lines = [line.strip() for line in why.strip().splitlines() if line.strip()]
    if not lines:
        return why
    fetch = next((line for line in lines[1:] if "hf download" in line), None)
    return lines[0] + (f" Fetch: `{fetch}`" if fetch else "")


_ARRAY_RE = re.compile(r"<array \d+>")


def clean_message(text: str, names: dict[str, str] | None = None, cache_dirs: tuple[str, ...] = ()) -> str:
    """A message fit for the page: upload paths become the name the user uploaded, any other path in
    a temporary folder becomes its file name, and '<array 0>' becomes 'the photo'."""
    for path, name in (names or {}).items():
        text = text.replace(path, name)
    roots = {str(Path(tempfile.gettempdir())), *cache_dirs}
    for root in sorted(roots, key=len, reverse=True):
        text = re.sub(re.escape(root.rstrip("/")) + r"/[^\s'\"`:,;)]*", lambda m: Path(m.group(0)).name, text)
    return _ARRAY_RE.sub("the photo", text)
