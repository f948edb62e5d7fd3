"""Dataset import: a parquet and a JSONL file of VERL-style records, mixing with counts, the CLI,
and errors naming the file, record and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gradalign_common.datasets import import_dataset
from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.modeling import load_tokenizer
from gradalign_common.prompts import decode_messages
from gradalign_common.records import read_problems
from gradalign_tools.cli import app


def _math_record(i: int) -> dict:
    return {
        "data_source": "math",
        "prompt": [{"role": "user", "content": f"What is {i}/2? Put the answer in \\boxed{{}}."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": f"\\frac{{{i}}}{{2}}"},
        "extra_info": {"index": i, "split": "train"},
    }


def _mc_record(i: int) -> dict:
    return {
        "data_source": "mmlupro",
        "prompt": f"Question {i}? (A) yes (B) no",  # a plain string prompt is accepted too
        "reward_model": {"ground_truth": "AB"[i % 2]},
        "extra_info": {"index": i},
    }


@pytest.fixture
def files(tmp_path):
    parquet = tmp_path / "dapo" / "train.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([_math_record(i) for i in range(10)]), parquet)
    jsonl = tmp_path / "mmlupro" / "train.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(_mc_record(i)) + "\n" for i in range(6)) + "\n")
    return parquet, jsonl


def test_import_parquet_and_jsonl(files, tmp_path):
    parquet, jsonl = files
    meta = import_dataset([(parquet, None)], "math-train", tmp_path / "out")
    problems = read_problems(meta["path"])
    assert meta["n_problems"] == len(problems) == 10 and not meta["mixed"]
    assert [p.problem_id for p in problems] == [str(i) for i in range(10)]  # file order, extra_info.index
    assert problems[3].ground_truth == "\\frac{3}{2}" and problems[3].data_source == "math"
    assert decode_messages(problems[3].prompt) == [{"role": "user", "content": "What is 3/2? Put the answer in \\boxed{}."}]
    saved = json.loads((tmp_path / "out" / "math-train.json").read_text())
    assert saved["sources"][0]["selected"] == 10 and saved["sha256"] == meta["sha256"]

    meta = import_dataset([(jsonl, 0)], "mc", tmp_path / "out")
    problems = read_problems(meta["path"])
    assert len(problems) == 6 and problems[1].ground_truth == "B"
    assert decode_messages(problems[0].prompt) == [{"role": "user", "content": "Question 0? (A) yes (B) no"}]


def test_mix_with_counts_is_seeded(files, tmp_path):
    parquet, jsonl = files
    meta = import_dataset([(parquet, 4), (jsonl, 3)], "mix", tmp_path / "out", seed=7)
    problems = read_problems(meta["path"])
    assert meta["mixed"] and meta["n_problems"] == 7 and meta["data_sources"] == {"math": 4, "mmlupro": 3}
    assert [s["available"] for s in meta["sources"]] == [10, 6]
    assert meta["ids_prefixed"]  # both files use indexes 0.. so ids become "<file>-<index>"
    assert len({p.problem_id for p in problems}) == 7
    assert {p.problem_id.split("-")[0] for p in problems} == {"0", "1"}
    again = read_problems(import_dataset([(parquet, 4), (jsonl, 3)], "mix2", tmp_path / "out", seed=7)["path"])
    other = read_problems(import_dataset([(parquet, 4), (jsonl, 3)], "mix3", tmp_path / "out", seed=8)["path"])
    assert again == problems and other != problems
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_tokenizer_records_prompt_lengths(files, tiny_model_dir, tmp_path):
    meta = import_dataset([(files[1], None)], "mc", tmp_path / "out", tokenizer=tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)  # no chat template: the prompt is the message's content
    assert meta["prompt_tokens"]["max"] == len(tokenizer("Question 0? (A) yes (B) no", add_special_tokens=False)["input_ids"])
    assert meta["prompt_tokens"]["chat_template"] is False


def test_errors_name_the_problem(files, tmp_path):
    parquet, jsonl = files
    with pytest.raises(NotFoundError, match="missing.jsonl"):
        import_dataset([(tmp_path / "missing.jsonl", None)], "x", tmp_path)
    with pytest.raises(InvalidInputError, match="asked for 11 problems but the file has 10"):
        import_dataset([(parquet, 11)], "x", tmp_path)
    with pytest.raises(InvalidInputError, match="invalid dataset name"):
        import_dataset([(parquet, None)], "../evil", tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**_math_record(0), "data_source": "nope"}) + "\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:1: unknown data_source 'nope'"):
        import_dataset([(bad, None)], "x", tmp_path)
    bad.write_text(json.dumps({"prompt": "hi", "data_source": "math"}) + "\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:1: missing field 'reward_model.ground_truth'"):
        import_dataset([(bad, None)], "x", tmp_path)
    bad.write_text("{not json\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:1: not valid JSON"):
        import_dataset([(bad, None)], "x", tmp_path)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(InvalidInputError, match="unsupported dataset format"):
        import_dataset([(csv, None)], "x", tmp_path)
    assert not (tmp_path / "x.parquet").exists()


def test_cli_import(files, tmp_path):
    parquet, jsonl = files
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app, ["data", "import", str(parquet), str(jsonl), "--name", "mix", "--count", "5", "--count", "0", "--out-dir", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "mix: 11 problems" in result.output and "5 of 10" in result.output and "6 of 6" in result.output
    assert len(read_problems(out / "mix.parquet")) == 11

    result = runner.invoke(app, ["data", "import", str(parquet), str(jsonl), "--name", "mix", "--count", "5", "--out-dir", str(out)])
    assert result.exit_code == 2 and "one --count per file" in result.output
    result = runner.invoke(app, ["data", "import", str(tmp_path / "nope.parquet"), "--name", "x", "--out-dir", str(out)])
    assert result.exit_code == 2 and "nope.parquet" in result.output
