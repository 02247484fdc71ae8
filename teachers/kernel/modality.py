"""The two modalities of an image-text model, as a type: every room names them through this, not "image"/"text".

`Modality` is a `StrEnum`, so `Modality.IMAGE == "image"` and it formats as "image" in paths and messages.
`Pair[T]` holds one value per modality (embeddings, projections, datasets) with typed fields instead of a
`{"image": ..., "text": ...}` dict: a typo is an AttributeError at the line, not a KeyError far away.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar


class _StrEnum310(str, Enum):
    """3.11's enum.StrEnum for Python 3.10 (requires-python): str() and format() give the value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


if sys.version_info >= (3, 11):
    from enum import StrEnum
else:
    StrEnum = _StrEnum310

T = TypeVar("T")
U = TypeVar("U")


class Modality(StrEnum):
    IMAGE = "image"
    TEXT = "text"


MODALITIES: tuple[Modality, ...] = tuple(Modality)


@dataclass(frozen=True)
class Pair(Generic[T]):
    """One value per modality. `pair[Modality.TEXT]` and iteration follow `MODALITIES` order (image, text)."""

    image: T
    text: T

    def __getitem__(self, modality: Modality) -> T:
        return getattr(self, Modality(modality).value)

    def items(self) -> Iterator[tuple[Modality, T]]:
        return ((m, self[m]) for m in MODALITIES)

    def map(self, fn: Callable[[T], U]) -> Pair[U]:
        """The same function applied to both values."""
        return Pair(fn(self.image), fn(self.text))

    @classmethod
    def build(cls, fn: Callable[[Modality], T]) -> Pair[T]:
        """A pair whose value for each modality is fn(modality)."""
        return cls(fn(Modality.IMAGE), fn(Modality.TEXT))
