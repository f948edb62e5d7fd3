"""A named registry: the one lookup behind selection modes, flag rules, reward functions and policy losses.

Each registry maps names to entries of one kind; `get` of an unknown name raises InvalidInputError naming
the kind and listing the valid names, so every "unknown X" error reads the same.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from gradalign_common.errors import InvalidInputError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries of one kind by name; `kind` and `plural` word the errors ("unknown flag rule 'x'; valid rules: ...")."""

    def __init__(self, kind: str, plural: str, entry_type: type | None = None):
        self.kind, self.plural, self.entry_type = kind, plural, entry_type
        self.entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry, *, replace: bool = False) -> Entry:
        """Register `entry` as `name`; ValueError if the name is taken, unless `replace`."""
        if name in self.entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.entries[name] = entry
        return entry

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self.entries)

    def get(self, name: str | Entry) -> Entry:
        """The entry called `name` (an entry of `entry_type` is returned as it is); InvalidInputError listing
        the valid names if there is none."""
        if self.entry_type is not None and isinstance(name, self.entry_type):
            return name
        try:
            return self.entries[name]
        except (KeyError, TypeError):
            raise InvalidInputError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries
