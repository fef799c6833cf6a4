"""Figures with their provenance: each value says where it came from; each absent one says why it is absent."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Figures:
    values: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    roots: dict[str, str] = field(default_factory=dict)  # the measured-figure reason at the bottom of each chain

    def put(self, key: str, value: float, source: str) -> None:
        self.values[key], self.sources[key] = value, source
        self.missing.pop(key, None)

    def miss(self, key: str, reason: str) -> None:
        self.values.pop(key, None)
        self.missing[key] = self.roots[key] = reason

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    def need(self, key: str, *inputs: str) -> list[float] | None:
        """The inputs' values, or None after recording that `key` is missing because of the first absent input."""
        for name in inputs:
            if name not in self.values:
                root = self.roots.get(name, f"{name} not measured")
                self.miss(key, f"needs {name}; {root}")
                self.roots[key] = root
                return None
        return [self.values[name] for name in inputs]

    def derive(self, key: str, inputs: tuple[str, ...], fn, source: str) -> None:
        """key = fn(*inputs), or missing with the reason of the first absent input."""
        args = self.need(key, *inputs)
        if args is not None:
            self.put(key, fn(*args), source)

    def rows(self, keys: list[str]) -> list[tuple[str, float | None, str]]:
        """(key, value or None, source or the reason it is missing) for each key."""
        return [(k, self.values.get(k), self.sources.get(k) or f"missing: {self.missing.get(k, 'not computed')}")
                for k in keys]
