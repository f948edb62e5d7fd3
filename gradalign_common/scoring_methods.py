"""Scoring methods, by name: how the per-candidate gradient signals (cos and dot with g_V) are computed.

The names and their grammar are shared (the scheduler validates an experiment's scoring_method
with parse_method); the scoring service implements each family (services/scoring/methods.py, its registry).

- exact: the spec's definition, several groups per forward and backward, each group's
  contribution separated on the fly (services.scoring.exact_collector); falls back to
  exact-loop for a model whose layers it does not know.
- exact-loop: the spec's definition the straightforward way, one group per backward and
  full per-group gradients (the internal reference of exact).
- project[-K] (approximate): LoGra-style per-layer random projections; each linear layer's
  weight gradient is seen through K x K Gaussian projections of its inputs and output
  gradients (default K = 16), never formed.
- top-layers[-N] (approximate): gradients of only the last N decoder layers and the final
  norm (default N = 1), so the backward stops at layer N from the top.
- fewer-responses[-M] (approximate): each candidate's gradient from M of its responses
  (default: half, rounded up), chosen by a seeded draw per problem; advantages still come
  from all of the group's rewards.

An approximate method is only used when asked for by name; it never replaces exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradalign_common.errors import InvalidInputError


@dataclass(frozen=True)
class MethodFamily:
    """What a method family's name means: whether it is exact, its size parameter, and which gradient
    space its validation gradient lives in (methods of one space can share a g_V)."""

    name: str
    exact: bool
    takes_size: bool = False
    default_size: int | None = None  # None: the family's own default (fewer-responses: half the group)
    full_gradient_space: bool = True  # g_V over every trainable parameter; else a space of its own per size


FAMILIES: dict[str, MethodFamily] = {
    f.name: f
    for f in (
        MethodFamily("exact", exact=True),
        MethodFamily("exact-loop", exact=True),
        MethodFamily("project", exact=False, takes_size=True, default_size=16, full_gradient_space=False),
        MethodFamily("top-layers", exact=False, takes_size=True, default_size=1, full_gradient_space=False),
        MethodFamily("fewer-responses", exact=False, takes_size=True),
    )
}
"""The method families, by name (the grammar of a method name is `family` or `family-N`)."""

METHODS = tuple(f.name + ("[-N]" if f.takes_size else "") for f in FAMILIES.values())
"""Help text: the method names `parse_method` accepts."""

_NAME_RE = re.compile(r"^(" + "|".join(re.escape(name) for name in FAMILIES) + r")(?:-(\d+))?$")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed scoring method: its family and its size parameter (None: the family's default)."""

    family: str
    parameter: int | None = None

    @property
    def name(self) -> str:
        return self.family if self.parameter is None else f"{self.family}-{self.parameter}"

    @property
    def exact(self) -> bool:
        return FAMILIES[self.family].exact

    @property
    def gradient_space(self) -> str:
        """Which space its g_V lives in: methods with the same space can share a validation gradient."""
        return "full" if FAMILIES[self.family].full_gradient_space else self.name


def parse_method(name: str | MethodSpec) -> MethodSpec:
    """The MethodSpec called `name` (e.g. exact, project-32, top-layers-2); InvalidInputError if unknown."""
    if isinstance(name, MethodSpec):
        return name
    match = _NAME_RE.match(name or "")
    if match is None:
        raise InvalidInputError(f"unknown scoring method {name!r}; valid methods: {', '.join(METHODS)}")
    family, number = FAMILIES[match.group(1)], match.group(2)
    if number is not None and not family.takes_size:
        raise InvalidInputError(f"unknown scoring method {name!r}; {family.name} takes no size")
    parameter = family.default_size if number is None else int(number)
    if parameter is not None and parameter < 1:
        raise InvalidInputError(f"scoring method {name!r}: the size must be >= 1")
    return MethodSpec(family.name, parameter)
