"""What the verl backend (services/trainer/backends/verl) hands verl and reads back, without verl
installed: the dataset in verl's RL parquet format, the reward function file verl loads, and the
metrics parsed from verl's console lines.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from gradalign_common.datasets import load_problems
from gradalign_common.errors import InvalidInputError
from gradalign_common.prompts import encode_messages
from gradalign_common.records import Problem
from services.trainer.backends.verl.dataset import verl_record, write_verl_dataset
from services.trainer.backends.verl.metrics import parse_console_metrics, step_metrics_from_verl
from services.trainer.verl_reward import compute_score
from verl_fixtures import SAMPLE


def test_the_dataset_is_verl_rl_parquet(tmp_path):
    problems = [
        Problem("p-1", encode_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]), "arith", "2"),
        Problem("p-2", encode_messages([{"role": "user", "content": "Say 7"}]), "exact_match", "7"),
    ]
    path = write_verl_dataset(tmp_path / "train.parquet", problems)
    table = pq.read_table(path)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    assert rows[0] == {
        "data_source": "arith",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"index": "p-1", "split": "train"},
    }
    assert rows[1] == verl_record(problems[1])
    assert rows[1]["ability"] == "exact_match"
    assert load_problems(path) == problems  # our VERL-format reader reads it back unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]
    with pytest.raises(InvalidInputError):
        write_verl_dataset(tmp_path / "empty.parquet", [])


def test_console_metrics_lines():
    line = (
        "(TaskRunner pid=123) step:3 - actor/pg_loss:np.float64(-0.25) - actor/kl_loss:0.002 - "
        "actor/grad_norm:np.float32(1.5) - actor/entropy:0.75 - actor/pg_clipfrac:0.125 - "
        "critic/score/mean:0.5 - response_length/mean:100.0 - timing_s/step:32.0 - perf/throughput:900.0 - "
        "training/epoch:0 - val-core/x/acc/mean@1:nan"
    )
    parsed = parse_console_metrics(line)
    assert parsed["step"] == 3 and parsed["actor/pg_loss"] == -0.25 and parsed["actor/grad_norm"] == 1.5
    m = step_metrics_from_verl(parsed, SAMPLE, n_gpus=8)
    assert m.step == 3 and m.mean_reward == 0.5 and m.kl == 0.002 and m.clip_fraction == 0.125
    assert m.loss == pytest.approx(-0.25 + 0.001 * 0.002 - 0.001 * 0.75)
    assert m.tokens_per_second == pytest.approx(100.0 * 64 / 32.0)
    no_timing = step_metrics_from_verl({k: v for k, v in parsed.items() if k != "timing_s/step"}, SAMPLE, 8)
    assert no_timing.tokens_per_second == 900.0 * 8
    assert parse_console_metrics("Training Progress:  25%|##5  | 1/4") is None
    assert parse_console_metrics("step:0 - val-core/acc:0.5") == {"step": 0.0, "val-core/acc": 0.5}
    assert step_metrics_from_verl({"step": 0.0, "val-core/acc": 0.5}, SAMPLE) is None  # validation only


def test_the_reward_file_verl_loads():
    assert compute_score("exact_match", "7", "7") == 1.0
    assert compute_score(data_source="arith", solution_str="12", ground_truth="13", extra_info={"index": "1"}) == 0.0
