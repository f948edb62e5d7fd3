"""Shared helpers of the rollout service tests: the service started in-process on a free port."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from gradalign_common.grpc_utils import channel
from gradalign_common.pb import rollout_pb2_grpc
from services.rollout.server import RolloutServicer, create_server
from services.rollout.settings import RolloutSettings


@contextlib.contextmanager
def serving_rollout(artifact_root: Path, reward_workers: int) -> Iterator[tuple[rollout_pb2_grpc.RolloutServiceStub, RolloutServicer]]:
    """The rollout service (batches of 8, a 32-token context) on 127.0.0.1: yields (stub, servicer), then stops it."""
    settings = RolloutSettings(port=0, artifact_root=artifact_root, batch_size=8, max_model_len=32, reward_workers=reward_workers)
    servicer = RolloutServicer(settings)
    server, _, port = create_server(settings, servicer)
    server.start()
    ch = channel(f"127.0.0.1:{port}")
    try:
        yield rollout_pb2_grpc.RolloutServiceStub(ch), servicer
    finally:
        ch.close()
        server.stop(0)
        servicer.close()
