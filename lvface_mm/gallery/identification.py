"""What a 1:N search answers for one face: the best enrolled person, or unknown below a threshold.

Its own module because both gallery backends use it: the in-memory one (``store.Gallery``) and the
on-disk one that follows the gallery file (``disk_sync.GalleryIndex``), which the store opens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Identification", "best_or_unknown"]


@dataclass(frozen=True)
class Identification:
    """Answer for one query embedding. Below the threshold ``name`` and ``identity_id`` are None
    ("unknown") and ``score`` is the best cosine found (-1.0 when the gallery is empty)."""

    name: str | None
    score: float
    identity_id: int | None

    @property
    def known(self) -> bool:
        return self.name is not None


def best_or_unknown(top1: Sequence[Sequence[Identification]], threshold: float) -> list[Identification]:
    """Per query, its best candidate when the score reaches ``threshold``, else unknown with that score
    (-1.0 when there is no candidate). ``top1`` is what a gallery's ``search(..., k=1)`` returns."""
    return [c[0] if c and c[0].score >= threshold else Identification(None, c[0].score if c else -1.0, None)
            for c in top1]
