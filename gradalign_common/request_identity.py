"""Request identity: a request_id names one request body, and a reused id with another body is refused.

The scheduler derives request ids from (experiment, round, stage, shard), so a retry of the same
work carries the same id. Workers record which request produced an output: its id and a
fingerprint of its body (`request_fingerprint`). A later request with the same id and the same
fingerprint is a retry; the same id with a different fingerprint is a caller bug (or two
experiments sharing paths) and is refused with RequestConflictError (gRPC ALREADY_EXISTS) instead
of silently returning, or overwriting, an output that does not match what was asked.

- The trainer keeps the fingerprint in its checkpoint marker (services/trainer/server.py).
- Rollout and scoring, which always recompute, keep a small sidecar JSON
  `<output_path>.request.json` = {"request_id", "fingerprint"}, written atomically after the
  output (`record_request`) and checked before work starts (`check_request`).
Records without a fingerprint (written before fingerprints existed) never conflict.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from google.protobuf.message import Message

from gradalign_common.artifacts import atomic_write_bytes
from gradalign_common.errors import RequestConflictError

SIDECAR_SUFFIX = ".request.json"


def request_fingerprint(message: Message) -> str:
    """sha256 (hex) of the message's deterministic serialization with its request_id field cleared."""
    body = type(message)()
    body.CopyFrom(message)
    body.ClearField("request_id")
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


def is_same_request(record: dict | None, request_id: str, fingerprint: str, where: str) -> bool:
    """Whether `record` ({"request_id", "fingerprint"?}) was made by this request.

    True: same id, and same fingerprint or none recorded. False: no record, or another id.
    Raises RequestConflictError when the id is the same and the recorded fingerprint differs.
    """
    if not record or not request_id or record.get("request_id") != request_id:
        return False
    recorded = record.get("fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise RequestConflictError(request_id, where)
    return True


def sidecar_path(output_path: str | Path) -> Path:
    """Where the identity of the request that wrote `output_path` is kept."""
    return Path(f"{output_path}{SIDECAR_SUFFIX}")


def read_request_record(output_path: str | Path) -> dict | None:
    """The sidecar of an existing output, or None when the output or its sidecar is missing or unreadable."""
    if not Path(output_path).exists():
        return None
    try:
        record = json.loads(sidecar_path(output_path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_request(output_path: str | Path, request_id: str, fingerprint: str) -> None:
    """Raise RequestConflictError if `output_path` was written under `request_id` from a different body."""
    is_same_request(read_request_record(output_path), request_id, fingerprint, str(output_path))


def record_request(output_path: str | Path, request_id: str, fingerprint: str) -> Path:
    """Write the sidecar of `output_path` atomically (after the output itself is in place)."""
    data = json.dumps({"request_id": request_id, "fingerprint": fingerprint}) + "\n"
    return atomic_write_bytes(sidecar_path(output_path), data.encode())
