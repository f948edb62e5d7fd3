"""Running the `gradalign` command line in-process (typer's CliRunner) from the tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from gradalign_tools.cli import app


def invoke(*args: str) -> Result:
    """`gradalign ARGS...`, whatever its exit code."""
    return CliRunner().invoke(app, list(args))


def invoke_ok(*args: str) -> str:
    """`gradalign ARGS...`, which must exit 0 (its output is the failure's message); its output."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def run_bench(results: Path, *args: str) -> tuple[Path, str]:
    """`gradalign ARGS... --results RESULTS` (a bench command writing under RESULTS), which must exit 0:
    (RESULTS, its output)."""
    return results, invoke_ok(*args, "--results", str(results))
