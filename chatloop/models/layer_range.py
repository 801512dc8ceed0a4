"""Which decoder layers a stage owns: a contiguous, inclusive range of global layer numbers."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerRange"]


@dataclass(frozen=True)
class LayerRange:
    """Layers ``start`` to ``end`` of the model, both inclusive (``start_layer``/``end_layer`` of a worker's config)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"layer range {self.start}-{self.end} is empty or negative: need 0 <= start <= end")

    @property
    def indices(self) -> range:
        return range(self.start, self.end + 1)

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"
