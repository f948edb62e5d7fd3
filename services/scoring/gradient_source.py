"""Where a scoring request's validation gradient g_V comes from: the one decision of whether it needs gradients.

The engine, the gRPC service and the `gradalign score` command all ask `gradient_source`, which
reads the mode's registration (SelectionMode.needs_gradients and .validation):
- a mode that needs no gradients (accgreedy, rand) is scored from the groups alone, no model;
- given validation rollouts (or a g_V computed from them) are used when the mode needs gradients:
  an external validation set (sim, dot, ...), or, for align, the whole round's candidates when a
  round is sharded over scorers (so every shard uses the same g_V);
- otherwise align's g_V comes from the request's own candidates, and a mode that needs an
  external validation set is refused.
"""

from __future__ import annotations

import enum

from gradalign_common.errors import InvalidInputError
from gradalign_common.selection import SelectionMode, ValidationSource


class GradientSource(enum.Enum):
    """Where a request's g_V comes from."""

    NONE = "none"  # the mode needs no gradients: no model pass
    VALIDATION = "validation"  # the given validation rollouts (or their g_V)
    CANDIDATES = "candidates"  # the request's own candidates (align without validation rollouts)


def gradient_source(mode: SelectionMode, has_validation: bool, validation_name: str = "validation rollouts") -> GradientSource:
    """Where `mode`'s g_V comes from, given whether the request has validation rollouts; InvalidInputError
    (naming them `validation_name`, e.g. --validation) when the mode needs them and there are none."""
    if not mode.needs_gradients:
        return GradientSource.NONE
    if has_validation:
        return GradientSource.VALIDATION
    if mode.validation is ValidationSource.CANDIDATES:
        return GradientSource.CANDIDATES
    raise InvalidInputError(f"mode {mode.name!r} needs {validation_name}")
