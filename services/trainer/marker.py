"""The training marker: the record a finished checkpoint keeps of the request that made it.

`gradalign-train.json` inside the checkpoint directory holds the request id, the request body's
fingerprint (gradalign_common.request_identity), the step metrics and the compute time
(TrainPlan.marker builds it). A backend writes it into the checkpoint's temporary directory
last, just before the rename, so a checkpoint with a marker is complete; the server reads it
to answer a retried request without training again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER_NAME = "gradalign-train.json"


def read_marker(checkpoint_dir: Path) -> dict | None:
    """The training marker of a finished checkpoint directory, or None when absent or unreadable."""
    try:
        marker = json.loads((checkpoint_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(staging: Path, marker: dict) -> None:
    """Write (and fsync) the marker into a checkpoint's temporary directory."""
    with open(staging / MARKER_NAME, "w") as fh:
        json.dump(marker, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
