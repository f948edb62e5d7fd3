"""What the API shows of an error a worker or a stage raised: server paths cut down to names relative to the
data root, the artifact store ("artifacts/...") and the models root ("models/..."), never absolute."""

from __future__ import annotations

from pathlib import Path

from services.scheduler.datasets import scrub_paths
from services.scheduler.settings import SchedulerSettings


def public_message(message: str, settings: SchedulerSettings) -> str:
    message = scrub_paths(message, settings.data_root, settings.artifact_root)
    root = Path(settings.models_root).expanduser()
    for form in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
        message = message.replace(form + "/", "models/").replace(form, "models")
    return message
