"""The `gradalign score` command, through a small typer app wrapping score_command."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from gradalign_common.records import write_rollouts, write_rollouts_jsonl
from services.scoring.cli import score_command
from services.scoring.engine import ScoringEngine
from scoring_fixtures import random_rollouts

SPEC_KEYS = {"problem_id", "score", "accuracy", "n_responses", "zero_advantage"}

app = typer.Typer()
app.command()(score_command)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    candidates = random_rollouts(seed=1, n_problems=6, prefix="c")
    validation = random_rollouts(seed=2, n_problems=4, prefix="v")
    return {
        "candidates": candidates,
        "validation": validation,
        "candidates_jsonl": write_rollouts_jsonl(root / "candidates.jsonl", candidates),
        "validation_parquet": write_rollouts(root / "validation.parquet", validation),
    }


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sim_writes_one_spec_line_per_candidate(files, random_qwen2_dir, tmp_path):
    out = tmp_path / "scores.jsonl"
    result = _run(
        "--model", random_qwen2_dir, "--candidates", files["candidates_jsonl"],
        "--validation", files["validation_parquet"], "--mode", "sim", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = _lines(out)
    assert all(set(line) == SPEC_KEYS for line in lines)
    engine = ScoringEngine.from_pretrained(random_qwen2_dir)
    expected = [s for s in engine.score(files["candidates"], "sim", files["validation"])]
    assert [line["problem_id"] for line in lines] == [s.problem_id for s in expected]
    for line, s in zip(lines, expected):
        assert line["score"] == pytest.approx(s.score, abs=1e-7)
        assert (line["accuracy"], line["n_responses"], line["zero_advantage"]) == (
            s.accuracy, s.n_responses, s.zero_advantage,
        )  # fmt: skip
    assert any(line["zero_advantage"] and line["score"] == 0.0 for line in lines)


@pytest.mark.parametrize("mode", ["align", "accgreedy", "rand"])
def test_modes_without_external_validation(files, random_qwen2_dir, tmp_path, mode):
    out = tmp_path / "scores.jsonl"
    result = _run("--model", random_qwen2_dir, "--candidates", files["candidates_jsonl"], "--mode", mode,
                  "--seed", "3", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = _lines(out)
    assert len(lines) == 6 and all(set(line) == SPEC_KEYS for line in lines)


def _bad_input_cases(files, model_dir, tmp_path) -> dict[str, tuple[list, str]]:
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"problem_id": "a", "prompt_ids": [1], "response_ids": [2], "reward": 1.0}\n{not json\n')
    no_tokens = tmp_path / "no-tokens.jsonl"
    no_tokens.write_text('{"problem_id": "a", "prompt_ids": [1], "response_ids": [], "reward": 1.0}\n')
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    cands = files["candidates_jsonl"]
    val = files["validation_parquet"]
    return {
        "missing candidates": (["--model", model_dir, "--candidates", tmp_path / "nope.jsonl", "--validation", val,
                                "--mode", "sim"], "nope.jsonl"),
        "malformed line": (["--model", model_dir, "--candidates", malformed, "--mode", "accgreedy"], "malformed.jsonl:2"),
        "no tokens": (["--model", model_dir, "--candidates", no_tokens, "--mode", "accgreedy"], "response_ids"),
        "unknown mode": (["--model", model_dir, "--candidates", cands, "--mode", "bogus"], "unknown selection mode"),
        "unknown method": (["--model", model_dir, "--candidates", cands, "--validation", val, "--mode", "sim",
                            "--method", "sketch"], "unknown scoring method"),
        "sim without validation": (["--model", model_dir, "--candidates", cands, "--mode", "sim"], "--validation"),
        "not a model": (["--model", not_a_model, "--candidates", cands, "--validation", val, "--mode", "sim"],
                        "not a Hugging Face model directory"),
        "missing model": (["--model", tmp_path / "gone", "--candidates", cands, "--mode", "align"], "gone"),
        "unknown dtype": (["--model", model_dir, "--candidates", cands, "--mode", "align", "--dtype", "int8"],
                          "unknown dtype"),
        "unknown device": (["--model", model_dir, "--candidates", cands, "--mode", "align", "--device", "tpu9"],
                           "device"),
    }  # fmt: skip


def test_bad_input_exits_2_with_a_message(files, random_qwen2_dir, tmp_path):
    for name, (args, message) in _bad_input_cases(files, random_qwen2_dir, tmp_path).items():
        out = tmp_path / f"{name}.jsonl"
        result = _run(*args, "--out", out)
        assert result.exit_code == 2, (name, result.output)
        assert message in result.stderr, (name, result.stderr)
        assert not out.exists(), name


def test_methods_and_optimizer_state(files, random_qwen2_dir, tmp_path):
    from gradalign_common.optimizer_state import read_optimizer_state, write_optimizer_state
    from scoring_fixtures import random_adam_state, tiny_qwen2

    base = ["--model", random_qwen2_dir, "--candidates", files["candidates_jsonl"],
            "--validation", files["validation_parquet"], "--mode", "sim"]  # fmt: skip
    outs = {}
    for name, extra in {"default": [], "project": ["--method", "project-8"], "top": ["--method", "top-layers"]}.items():
        outs[name] = tmp_path / f"{name}.jsonl"
        result = _run(*base, *extra, "--out", outs[name])
        assert result.exit_code == 0, result.output
        assert len(_lines(outs[name])) == 6
    assert [line["score"] for line in _lines(outs["project"])] != [line["score"] for line in _lines(outs["default"])]
    state = random_adam_state(tiny_qwen2(seed=0))
    path = write_optimizer_state(tmp_path / "optimizer.safetensors", state.exp_avg_sq, step=state.step,
                                 beta2=state.beta2, eps=state.eps)
    out = tmp_path / "preconditioned.jsonl"
    result = _run(*base, "--optimizer-state", path, "--out", out)
    assert result.exit_code == 0, result.output
    engine = ScoringEngine.from_pretrained(random_qwen2_dir)
    p = engine.preconditioner(read_optimizer_state(path))
    expected = [s.score for s in engine.score(files["candidates"], "sim", files["validation"], preconditioner=p)]
    assert [line["score"] for line in _lines(out)] == pytest.approx(expected, abs=1e-6)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    for args, message in [(["--optimizer-state", bad], "not a readable safetensors"),
                          (["--optimizer-state", tmp_path / "nope.safetensors"], "not found"),
                          (["--method", "project-0"], "size must be")]:
        result = _run(*base, *args, "--out", tmp_path / "x.jsonl")
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)


def test_memory_budget_option(files, random_qwen2_dir, tmp_path):
    """--memory-budget plans the batches (the scores do not change); a budget that is not one exits 2."""
    common = ["--model", random_qwen2_dir, "--candidates", files["candidates_jsonl"],
              "--validation", files["validation_parquet"], "--mode", "sim"]
    scores = {}
    for budget in ("1MiB", "0.5"):
        out = tmp_path / f"scores-{budget}.jsonl"
        result = _run(*common, "--memory-budget", budget, "--out", out)
        assert result.exit_code == 0, result.output
        scores[budget] = [line["score"] for line in _lines(out)]
    assert scores["1MiB"] == pytest.approx(scores["0.5"], abs=1e-6)
    result = _run(*common, "--memory-budget", "lots", "--out", tmp_path / "bad.jsonl")
    assert result.exit_code == 2 and "memory budget" in result.output
