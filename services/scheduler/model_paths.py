"""An experiment's `model`: a Hugging Face model directory under the models root, or a checkpoint in the
artifact store. Whatever is wrong, the answer is one message that tells nothing of the server's files
(which paths exist, which are directories, what they hold)."""

from __future__ import annotations

from pathlib import Path

from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import check_model_dir

UNUSABLE_MODEL = "not a usable model under the models root"


def resolve_model(ref: str, models_root: Path, artifact_root: Path) -> Path:
    """The resolved model directory named by ref (absolute, or relative to models_root).

    Raises InvalidInputError(UNUSABLE_MODEL) when ref lies outside both roots (after resolving symlinks
    and '..'), does not exist, or is not a Hugging Face model directory with weights.
    """
    if not ref or "\x00" in ref:
        raise InvalidInputError(UNUSABLE_MODEL)
    roots = [Path(root).expanduser().resolve() for root in (models_root, artifact_root)]
    try:
        resolved = (roots[0] / Path(ref).expanduser()).resolve()  # an absolute ref replaces the root
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        raise InvalidInputError(UNUSABLE_MODEL) from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise InvalidInputError(UNUSABLE_MODEL)
    try:
        return check_model_dir(resolved)
    except (InvalidInputError, OSError):
        raise InvalidInputError(UNUSABLE_MODEL) from None
