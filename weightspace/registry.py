"""One catalogue of what weightspace can do: weight-space ops, merge methods and recipe kinds.

Each entry names one method once — its name as the user types it, a title, the formula, what it does in words,
the paper it comes from and its defaults — and carries the object that implements it. Entries live beside what
they describe (``ops.stream`` registers the soups and interpolation, ``ops.merge`` the merge methods,
``experiments`` the recipe kinds); the CLI help, model cards and ``weightspace methods`` (docs/methods.md) read
them from here, so a title, formula or paper is written in one place only.

Families: ``op`` (anything that writes a checkpoint; its name is the ``op`` of the provenance), ``merge`` (a merge
method of ``weightspace merge --method``; also an op) and ``recipe`` (a recipe ``kind:``). Names are compared with
``_`` and ``-`` treated alike, so ``task_arithmetic`` (provenance) and ``task-arithmetic`` (CLI) are one entry.

Registering needs the modules that implement the methods, and they need torch. ``catalogue.json`` beside this
module holds every entry's fields (not its implementation) as the registry lists them, so that ``weightspace
methods`` and the CLI's choices read them without importing torch; ``tests/test_registry.py`` keeps the file equal
to the registry, and ``experiments.runner.write_catalogue()`` rewrites it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import ConfigError

__all__ = ["Paper", "Entry", "Registry", "REGISTRY", "register", "FAMILIES", "CATALOGUE", "static_entries"]

FAMILIES = ("op", "merge", "recipe")


@dataclass(frozen=True)
class Paper:
    """A paper a method comes from."""

    authors: str  # "Wortsman et al."
    year: int
    title: str
    venue: str
    url: str

    @property
    def short(self) -> str:
        """'Wortsman et al. 2022'."""
        return f"{self.authors} {self.year}"

    def cite(self) -> str:
        """One line: authors year, *title*, venue (url)."""
        return f"{self.short}, *{self.title}*, {self.venue} ({self.url})"

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {"authors": self.authors, "year": self.year, "title": self.title, "venue": self.venue, "url": self.url}


@dataclass(frozen=True)
class Entry:
    """One registered method: what it is called, what it computes, where it comes from, and what runs it."""

    family: str
    name: str  # as the user types it: 'task-arithmetic', 'greedy-soup', 'align-barrier'
    title: str  # 'Task arithmetic'
    formula: str  # 'θ_base + λ·Σ_t τ_t'
    summary: str  # one sentence, lower-case start, no final full stop (the model card's Method line)
    paper: Paper | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    target: Any = field(default=None, compare=False, repr=False)  # the class or function that implements it

    @property
    def key(self) -> str:
        """The name as looked up: lower case, '_' read as '-'."""
        return normalise(self.name)

    def to_dict(self) -> dict:
        """JSON-ready fields (the implementing object is left out)."""
        return {"family": self.family, "name": self.name, "title": self.title, "formula": self.formula,
                "summary": self.summary, "paper": self.paper.to_dict() if self.paper else None,
                "defaults": dict(self.defaults)}


    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Entry":
        """The entry ``to_dict`` wrote (without its implementing object)."""
        paper = Paper(**d["paper"]) if d.get("paper") else None
        return cls(d["family"], d["name"], d["title"], d["formula"], d["summary"], paper, dict(d.get("defaults") or {}))


def normalise(name: str) -> str:
    """'Task_Arithmetic' → 'task-arithmetic'."""
    return str(name).strip().lower().replace("_", "-")


class Registry:
    """Entries by family and name."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}

    def add(self, entry: Entry) -> Entry:
        """Register ``entry``.

        Raises:
            ValueError: unknown family, or another entry of the family already has that name (a programming
                error, not bad input).
        """
        if entry.family not in FAMILIES:
            raise ValueError(f"registry: unknown family {entry.family!r} (known: {', '.join(FAMILIES)})")
        k = (entry.family, entry.key)
        old = self._entries.get(k)
        if old is not None and old.target is not entry.target:
            raise ValueError(f"registry: {entry.family} {entry.name!r} is registered twice")
        self._entries[k] = entry
        return entry

    def get(self, family: str, name: str, *, what: str | None = None, param: str | None = None) -> Entry:
        """The entry of ``family`` called ``name``.

        Raises:
            ConfigError: no such entry; the message names ``what`` (e.g. 'method=ties2') and lists the known names;
                ``param`` is the library parameter that named it (``.param`` of the error).
        """
        e = self._entries.get((family, normalise(name)))
        if e is None:
            known = ", ".join(self.names(family)) or "none registered"
            raise ConfigError(f"{what or f'{family} {name}'}: expected one of {known}", param=param)
        return e

    def find(self, name: str, families: tuple[str, ...] = FAMILIES) -> Entry | None:
        """The first entry called ``name`` in ``families`` (in that order), or None."""
        for fam in families:
            e = self._entries.get((fam, normalise(name)))
            if e is not None:
                return e
        return None

    def entries(self, family: str | None = None) -> list[Entry]:
        """Every entry of ``family`` (all families when None), by family then name (whatever the import order)."""
        return sorted((e for e in self._entries.values() if family is None or e.family == family),
                      key=lambda e: (FAMILIES.index(e.family), e.key))

    def names(self, family: str) -> list[str]:
        """The names of ``family``, sorted."""
        return [e.name for e in self.entries(family)]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __contains__(self, item: tuple[str, str]) -> bool:
        family, name = item
        return (family, normalise(name)) in self._entries


REGISTRY = Registry()


def register(entry: Entry) -> Entry:
    """Add ``entry`` to the one registry and return it (see Registry.add)."""
    return REGISTRY.add(entry)


CATALOGUE = Path(__file__).with_name("catalogue.json")


def static_entries(family: str | None = None) -> list[Entry]:
    """Every entry of ``family`` (all when None) as ``catalogue.json`` lists them — the registry's fields without the
    implementing objects, read without importing what implements them (torch)."""
    entries = [Entry.from_dict(d) for d in json.loads(CATALOGUE.read_text(encoding="utf-8"))]
    return [e for e in entries if family is None or e.family == family]
