"""`gradalign bench rollout` at a tiny size: it runs both modes on the same prompts and prints
one row each, the load/swap times and the speedup (timings are never asserted). The vllm
backend's run (`--backend vllm`, from .venv-vllm) is in tests/test_vllm_rollout.py."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from gradalign_tools.cli import app

ROW = re.compile(r"^(one generate per response|batched hf backend)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$")
MODEL_ROW = re.compile(r"^batched hf backend\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)x$", re.M)


def _rows(output: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in output.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return rows


def test_bench_rollout_builds_the_tiny_model_and_prints_rows():
    result = CliRunner().invoke(
        app, ["bench", "rollout", "--prompts", "3", "--samples", "2", "--max-tokens", "3", "--warmup-steps", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "tiny model (built in" in result.output and "3 prompts x 2 samples, up to 3 tokens" in result.output
    rows = _rows(result.output)
    assert set(rows) == {"one generate per response", "batched hf backend"}
    for responses, tokens in rows.values():
        assert responses == 6 and 6 <= tokens <= 18  # 1..3 tokens per response
    assert re.search(r"^speedup: [\d.]+x generated tokens/s \(target >= 5x\)$", result.output, re.M)
    assert MODEL_ROW.search(result.output)  # the hf backend's load and in-place swap times


def test_bench_rollout_on_a_given_model(tiny_model_dir):
    result = CliRunner().invoke(
        app, ["bench", "rollout", "--model", str(tiny_model_dir), "--prompts", "4", "--samples", "2", "--batch-size", "2"]
    )
    assert result.exit_code == 0, result.output
    assert str(tiny_model_dir) in result.output
    assert {k: v[0] for k, v in _rows(result.output).items()} == {"one generate per response": 8, "batched hf backend": 8}


def test_bench_rollout_rejects_unknown_backends_and_names_the_vllm_environment(monkeypatch):
    result = CliRunner().invoke(app, ["bench", "rollout", "--backend", "hf,nope"])
    assert result.exit_code == 2 and "nope" in result.output
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # `import vllm` fails, as in the main environment
    result = CliRunner().invoke(app, ["bench", "rollout", "--backend", "vllm"])
    assert result.exit_code == 2 and "make vllm-env" in result.output
