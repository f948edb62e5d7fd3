"""`gradalign bench cancel` at a small size: every worker is cancelled mid-request, becomes idle, keeps no
output and accepts the next request (timings bounded generously only)."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from gradalign_tools.cli import app

ROW = re.compile(
    r"^(rollout|scoring|trainer)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(no|yes)\s+(accepted|REFUSED)\s+(met|MISSED)$"
)


def test_bench_cancel_at_a_small_size(tiny_model_dir, tmp_path):
    out = tmp_path / "cancel.json"
    result = CliRunner().invoke(
        app,
        ["bench", "cancel", "--model", str(tiny_model_dir), "--scale", "0.1", "--repeats", "1", "--delay", "0.2",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.match, result.output.splitlines()) if m}
    assert set(rows) == {"rollout", "scoring", "trainer"}, result.output
    for service, (baseline, latency, worst, ratio, left, following, _) in rows.items():
        assert float(baseline) > 0 and 0 <= float(latency) <= float(worst) < 30, (service, result.output)
        assert left == "no" and following == "accepted", (service, result.output)
    assert "baseline = measured" in result.output
    data = json.loads(out.read_text())
    assert [r["service"] for r in data["runs"]] == ["rollout", "scoring", "trainer"]
    assert all(len(r["latencies_s"]) == 1 and r["baseline_s"] > 0 for r in data["runs"])


def test_bench_cancel_rejects_an_unknown_service():
    result = CliRunner().invoke(app, ["bench", "cancel", "--services", "rollout,nope"])
    assert result.exit_code == 2 and "nope" in result.output
