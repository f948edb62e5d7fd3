"""The `gradalign` command line."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import typer

from gradalign_common.settings import DEFAULT_HOME
from gradalign_tools.bench.cancel import cancel_command
from gradalign_tools.bench.orchestrator import orchestrator_command
from gradalign_tools.bench.scheduler import scheduler_command
from services.scheduler.admin_cli import db_app, token_app
from gradalign_tools.bench.rollout import rollout_command
from gradalign_tools.bench.scoring import scoring_command
from gradalign_tools.bench.quality import quality_command, quality_flags_command
from gradalign_tools.bench.quality.sweep import quality_sweep_command
from gradalign_tools.data_cli import data_app
from services.scoring.cli import score_command
from gradalign_tools.stack import SERVICES, LocalStack, StackConfig

app = typer.Typer(help="GradAlign Platform: gradient-aligned data selection for LLM RL.", no_args_is_help=True)
model_app = typer.Typer(help="Models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
bench_app = typer.Typer(help="Benchmarks: each prints ratios against a baseline run in the same process.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
# bench commands are registered here, one line each:
bench_app.command("rollout")(rollout_command)
bench_app.command("scheduler")(scheduler_command)
bench_app.command("orchestrator")(orchestrator_command)
bench_app.command("scoring")(scoring_command)
bench_app.command("quality")(quality_command)
bench_app.command("quality-flags")(quality_flags_command)
bench_app.command("quality-sweep")(quality_sweep_command)
bench_app.command("cancel")(cancel_command)
app.command("score", help="Score candidate problems against a validation set (shared/spec/gradalign-score.md).")(score_command)


@app.command()
def serve(name: str = typer.Argument(..., help="scheduler, rollout, scoring or trainer")) -> None:
    """Run one service in the foreground (configured by its GRADALIGN_<NAME>_* environment)."""
    if name == "scheduler":
        from services.scheduler.app import main
    elif name == "rollout":
        from services.rollout.server import main
    elif name == "scoring":
        from services.scoring.server import main
    elif name == "trainer":
        from services.trainer.server import main
    else:
        typer.echo(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    main()


@app.command()
def up(
    home: Path = typer.Option(DEFAULT_HOME, help="state folder: database, artifacts, logs"),
    api_port: int = typer.Option(8000),
    rollout_port: int = typer.Option(50051),
    scoring_port: int = typer.Option(50052),
    trainer_port: int = typer.Option(50053),
    database_url: str = typer.Option(None, help="default: SQLite under --home"),
    redis_url: str = typer.Option(None, help="default: in-process event bus"),
    models_root: Path = typer.Option(None, help="experiments' models must lie under it; default: <home>/models"),
) -> None:
    """Start scheduler, rollout, scoring and trainer locally; stop them all on Ctrl-C or when one dies."""
    config = StackConfig(
        home=home, api_port=api_port, rollout_port=rollout_port, scoring_port=scoring_port,
        trainer_port=trainer_port, database_url=database_url, redis_url=redis_url,
        models_root=models_root or home / "models",
    )
    stack = LocalStack(config)
    stopping = {"flag": False}

    def _on_signal(signum, frame):  # noqa: ARG001
        stopping["flag"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        stack.stop()
        raise typer.Exit(1)
    typer.echo(f"GradAlign is up. Dashboard: {config.api_url}/  API schema: {config.api_url}/openapi.json  logs: {stack.log_dir}")
    typer.echo(f"Models for experiments go under {config.models_root}")
    typer.echo(f"API token for this session (Authorization: Bearer ...): {config.api_token}")
    code = 0
    while not stopping["flag"]:
        dead = stack.dead()
        if dead:
            typer.echo(f"error: the {dead} service exited (code {stack.procs[dead].returncode}); see {stack.log_path(dead)}. Stopping all.", err=True)
            code = 1
            break
        time.sleep(0.5)
    stack.stop()
    typer.echo("stopped")
    raise typer.Exit(code)


@app.command()
def demo(home: Path = typer.Option(Path(".gradalign"), help="state folder for the demo")) -> None:
    """Build the tiny model, start the stack, run a 2-round GradAlign experiment and report."""
    from gradalign_tools.demo import run_demo

    raise typer.Exit(run_demo(home))


@model_app.command("build-tiny")
def build_tiny(
    out: Path = typer.Option(..., help="output Hugging Face model directory"),
    warmup_steps: int = typer.Option(450, min=0, help="warm-up steps (the default model: 450)"),
    seed: int = typer.Option(0),
) -> None:
    """Build the tiny Qwen2 model with a character tokenizer, warm-started on arithmetic."""
    from gradalign_common.tiny_model import TinyModelSpec, build_and_save

    build_and_save(out, TinyModelSpec(warmup_steps=warmup_steps, seed=seed))
    typer.echo(str(out))


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
