"""A trainer process killed with SIGKILL mid-request leaves no checkpoint (partial or whole) at
the output path, and the same request succeeds on a restarted trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc

from gradalign_common.grpc_utils import wait_healthy
from gradalign_common.modeling import load_model
from gradalign_common.pb import training_pb2_grpc
from gradalign_common.records import write_problems
from gradalign_tools.stack import free_port
from test_trainer_service import request
from trainer_fixtures import constant_answer_problems


def _start(port: int, artifacts) -> subprocess.Popen:
    env = {**os.environ, "GRADALIGN_TRAINER_PORT": str(port), "GRADALIGN_TRAINER_ARTIFACT_ROOT": str(artifacts)}
    proc = subprocess.Popen([sys.executable, "-m", "services.trainer.server"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_healthy(f"127.0.0.1:{port}", timeout=120), "trainer did not start"
    return proc


def test_killed_trainer_leaves_nothing_and_the_request_can_be_retried(tmp_path, random_tiny_checkpoint):
    artifacts = tmp_path / "artifacts"
    problems = write_problems(artifacts / "selection.parquet", constant_answer_problems(6))
    out = artifacts / "checkpoints" / "round-00000"
    port = free_port()
    proc = _start(port, artifacts)
    try:
        stub = training_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stream = stub.Train(request(random_tiny_checkpoint, problems, out, steps=200))
        next(stream)  # the first step is done: training is under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.2)
        assert not out.exists()
        assert not any(p.name.startswith("round-00000") for p in out.parent.iterdir()) if out.parent.exists() else True
        proc = _start(port, artifacts)
        stub = training_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        events = list(stub.Train(request(random_tiny_checkpoint, problems, out, steps=2)))
        assert events[-1].result.checkpoint == str(out) and events[-1].result.steps == 2
        load_model(out)
    finally:
        proc.kill()
        proc.wait()
