"""Rollout backends: the vLLM request/output mapping without vllm (stand-in objects with vLLM's
attribute names, and a stand-in `vllm` module for the backend's load/swap/generate logic), and
the hf backend's batching: deterministic for a seed, same greedy tokens as one call per response."""

from __future__ import annotations

import json
import shutil
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from gradalign_common.datasets import load_problems
from gradalign_common.generation import (
    Sampling,
    cut_response,
    length_sorted_batches,
    prompt_token_ids,
    sample_responses,
    sample_responses_unbatched,
)
from gradalign_common.modeling import load_model, load_tokenizer
from gradalign_common.prompts import render_prompt
from gradalign_common.tiny_task import write_splits
from services.rollout.backends import create_backend
from services.rollout.backends.base import Sample
from gradalign_common.modeling import resolve_dtype
from services.rollout.backends.vllm import (
    cpu_environment,
    engine_kwargs,
    finish_reason,
    prompt_seed,
    sampling_params_kwargs,
    samples_from_outputs,
    token_prompts,
)
from services.rollout.settings import RolloutSettings

# --- vLLM mapping, pure -----------------------------------------------------------------------


def test_importing_the_vllm_backend_does_not_import_vllm():
    import services.rollout.backends.vllm  # noqa: F401

    assert "vllm" not in sys.modules


def test_resolve_dtype():
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    for explicit in ("float32", "bfloat16", "float16"):  # an explicit dtype wins on any device
        assert resolve_dtype(explicit, "cuda") == resolve_dtype(explicit, "cpu") == explicit
    assert RolloutSettings().dtype == "auto"


def test_hf_backend_auto_dtype_is_float32_on_cpu(tiny_model_dir):
    backend = create_backend(RolloutSettings())
    backend.load(str(tiny_model_dir))
    assert next(backend.model.parameters()).dtype == torch.float32
    assert backend.cache.dtype == "float32"
    backend = create_backend(RolloutSettings(dtype="bfloat16"))
    backend.load(str(tiny_model_dir))
    assert next(backend.model.parameters()).dtype == torch.bfloat16


def test_engine_kwargs():
    settings = RolloutSettings(backend="vllm", tensor_parallel_size=4, max_model_len=4096, gpu_memory_utilization=0.7, dtype="bfloat16")
    kw = engine_kwargs("/ckpt/round-1", settings)
    assert kw["model"] == kw["tokenizer"] == "/ckpt/round-1"
    assert (kw["tensor_parallel_size"], kw["max_model_len"], kw["gpu_memory_utilization"], kw["dtype"]) == (4, 4096, 0.7, "bfloat16")
    assert kw["seed"] == 0 and kw["trust_remote_code"] is False
    assert engine_kwargs("/c", settings, "cpu")["dtype"] == "bfloat16"  # explicit wins
    auto = RolloutSettings(backend="vllm")
    assert engine_kwargs("/c", auto, "cuda")["dtype"] == "bfloat16" and engine_kwargs("/c", auto, "cpu")["dtype"] == "float32"


def test_cpu_environment_defaults_do_not_override():
    settings = RolloutSettings(backend="vllm", vllm_cpu_kvcache_space_gib=3)
    assert cpu_environment(settings, {}) == {
        "VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"
    }
    assert cpu_environment(RolloutSettings(), {})["VLLM_CPU_KVCACHE_SPACE"] == "1"
    set_by_user = {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    assert cpu_environment(settings, set_by_user) == {}


def test_sampling_params_kwargs():
    sampling = Sampling(n=8, max_tokens=128, temperature=0.7, top_p=0.95, seed=3, stop=("</answer>",))
    prompts = [[5, 6, 7], [8], [9, 9]]
    kws = sampling_params_kwargs(sampling, prompts)
    assert len(kws) == 3
    for kw in kws:
        assert (kw["n"], kw["max_tokens"], kw["temperature"], kw["top_p"]) == (8, 128, 0.7, 0.95)
        assert kw["stop"] == ["</answer>"] and kw["include_stop_str_in_output"] is True
    assert len({kw["seed"] for kw in kws}) == 3  # each prompt its own seed...
    assert kws == sampling_params_kwargs(sampling, prompts)  # ...deterministic for the request's seed
    assert sampling_params_kwargs(Sampling(seed=4), [[1]])[0]["seed"] != sampling_params_kwargs(Sampling(seed=3), [[1]])[0]["seed"]
    assert sampling_params_kwargs(Sampling(), [[1]])[0]["stop"] is None
    # greedy samples are all alike and vLLM refuses n > 1 with them: it is asked for one
    assert sampling_params_kwargs(Sampling(n=4, temperature=0.0), [[1]])[0]["n"] == 1
    # a prompt's seed depends on the request's seed and the prompt, not on its position or neighbours
    shuffled = sampling_params_kwargs(sampling, [[9, 9], [1, 2], [5, 6, 7]])
    assert shuffled[0]["seed"] == kws[2]["seed"] and shuffled[2]["seed"] == kws[0]["seed"]
    assert kws[0]["seed"] == prompt_seed(3, [5, 6, 7]) < 2**63 - 1
    # the same prompt twice in one call: two seeds (two independent sets of samples)
    twice = sampling_params_kwargs(sampling, [[8], [5, 6, 7], [8]])
    assert twice[0]["seed"] == kws[1]["seed"] and twice[2]["seed"] == prompt_seed(3, [8], 1) != twice[0]["seed"]


def test_token_prompts():
    assert token_prompts([(1, 2, 3), [4]]) == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]


def _completion(index, ids, text, reason):
    return SimpleNamespace(index=index, token_ids=ids, text=text, finish_reason=reason, stop_reason=None)


def test_samples_from_outputs():
    outputs = [
        SimpleNamespace(
            prompt_token_ids=[5, 6],
            outputs=[_completion(1, (7, 1), "7", "stop"), _completion(0, [8, 9, 10], "89x", "length")],
        ),
        SimpleNamespace(prompt_token_ids=[11], outputs=[_completion(0, [12], "c", "stop"), _completion(1, [], "", None)]),
    ]
    samples = samples_from_outputs(outputs, [[5, 6], [11]], n=2)
    assert samples == [
        [Sample((8, 9, 10), "89x", "length"), Sample((7, 1), "7", "stop")],  # ordered by completion index
        [Sample((12,), "c", "stop"), Sample((), "", "length")],
    ]
    with pytest.raises(RuntimeError, match="2 outputs for 1 prompts"):
        samples_from_outputs(outputs, [[5, 6]], n=2)
    with pytest.raises(RuntimeError, match="expected 3"):
        samples_from_outputs(outputs, [[5, 6], [11]], n=3)
    with pytest.raises(RuntimeError, match="another prompt"):
        samples_from_outputs(outputs, [[5, 6], [99]], n=2)
    assert finish_reason("stop") == "stop" and finish_reason("length") == "length" and finish_reason("abort") == "abort"


# --- the vllm backend's logic with a stand-in vllm module -------------------------------------


class _FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.rpcs = []
        self.prefix_resets = 0
        _FakeLLM.instances.append(self)

    fail_rpcs: set = set()  # methods that raise, as an engine without in-place reload would

    def collective_rpc(self, method, args=(), kwargs=None):
        self.rpcs.append((method, args, kwargs or {}))
        if method in self.fail_rpcs:
            raise RuntimeError(f"{method} is not supported")
        return [None]

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        outs = []
        for prompt, params in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            completions = [
                _completion(j, [ids[-1], params.kwargs["seed"] % 50 + 3], f"s{j}", "length") for j in range(params.kwargs["n"])
            ]
            outs.append(SimpleNamespace(prompt_token_ids=list(ids), outputs=completions))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(kwargs=kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    _FakeLLM.instances = []
    _FakeLLM.fail_rpcs = set()
    return module


def test_vllm_backend_needs_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(RuntimeError, match="gpu extra.*make vllm-env"):
        create_backend(RolloutSettings(backend="vllm"))


def test_vllm_backend_load_swap_generate(fake_vllm, tiny_model_dir, tmp_path):
    backend = create_backend(RolloutSettings(backend="vllm", max_model_len=64, dtype="bfloat16"))
    tokenizer = backend.load(str(tiny_model_dir))
    assert tokenizer is not None and backend.loads == 1
    llm = _FakeLLM.instances[0]
    assert llm.kwargs["model"] == str(tiny_model_dir.resolve()) and llm.kwargs["max_model_len"] == 64
    backend.load(str(tiny_model_dir))  # same checkpoint: nothing happens
    assert backend.loads == 1 and not llm.rpcs

    out = backend.generate([[4, 5], [6]], Sampling(n=3, max_tokens=2, seed=1))
    assert [len(s) for s in out] == [3, 3] and out[0][0].token_ids[0] == 5 and out[1][0].token_ids[0] == 6
    greedy = backend.generate([[4, 5], [6]], Sampling(n=3, max_tokens=2, temperature=0.0))
    assert [len(s) for s in greedy] == [3, 3] and all(s == [s[0]] * 3 for s in greedy)

    # same architecture and tokenizer, new weights: swapped in place, prefix cache dropped
    other = tmp_path / "round-1"
    shutil.copytree(tiny_model_dir, other)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(other)
    backend.load(str(other))
    assert backend.swaps == 1 and backend.loads == 1 and len(_FakeLLM.instances) == 1
    assert llm.rpcs == [("gradalign_reload_weights", (), {"weights_path": str(other.resolve())})] and llm.prefix_resets == 1
    assert llm.kwargs["worker_extension_cls"] == "services.rollout.backends.vllm_worker.GradAlignWorkerExtension"
    assert backend.swap_failures == 0 and backend.swap_seconds > 0 and backend.load_seconds > 0

    # another architecture: the engine is rebuilt
    config = json.loads((other / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (other / "config.json").write_text(json.dumps(config))
    backend.load(str(other))
    assert backend.loads == 2 and len(_FakeLLM.instances) == 2
    backend.close()


def test_architecture_key_ignores_where_the_tokenizer_was_loaded_from(tiny_model_dir, tmp_path):
    from services.rollout.backends.vllm import architecture_key

    key = architecture_key(tiny_model_dir)
    resaved = shutil.copytree(tiny_model_dir, tmp_path / "resaved")  # as the trainer saves it
    tc = json.loads((resaved / "tokenizer_config.json").read_text())
    (resaved / "tokenizer_config.json").write_text(json.dumps({**tc, "is_local": True, "local_files_only": True}, indent=1))
    config = json.loads((resaved / "config.json").read_text())
    (resaved / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0", "dtype": "bfloat16"}))
    assert architecture_key(resaved) == key
    (resaved / "tokenizer_config.json").write_text(json.dumps({**tc, "model_max_length": 7}))
    assert architecture_key(resaved) != key  # a real tokenizer setting
    (resaved / "tokenizer_config.json").write_text(json.dumps(tc))
    (resaved / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert architecture_key(resaved) != key


def test_a_failed_inplace_swap_is_logged_counted_and_rebuilds(fake_vllm, tiny_model_dir, tmp_path):
    from structlog.testing import capture_logs

    backend = create_backend(RolloutSettings(backend="vllm", max_model_len=64))
    backend.load(str(tiny_model_dir))
    _FakeLLM.fail_rpcs = {"gradalign_reload_weights"}
    other = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    with capture_logs() as logs:
        backend.load(str(other))
    assert (backend.loads, backend.swaps, backend.swap_failures) == (2, 0, 1) and len(_FakeLLM.instances) == 2
    assert _FakeLLM.instances[1].kwargs["model"] == str(other.resolve())
    [failed] = [e for e in logs if e["event"] == "vllm_inplace_swap_failed"]
    assert failed["log_level"] == "warning" and "gradalign_reload_weights is not supported" in failed["error"]
    assert failed["checkpoint"] == str(other.resolve()) and failed["swap_failures"] == 1
    backend.close()


def test_service_exports_load_and_swap_counters(fake_vllm, tiny_model_dir, tmp_path):
    from prometheus_client import REGISTRY

    from gradalign_common.grpc_utils import channel
    from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
    from gradalign_common.records import write_problems
    from services.rollout.server import RolloutServicer, create_server

    def metric(name):
        return REGISTRY.get_sample_value(name, {"backend": "vllm"}) or 0.0

    names = ("model_loads_total", "weight_swaps_total", "swap_failures_total", "weight_swap_seconds_total")
    before = {n: metric(f"gradalign_rollout_{n}") for n in names}
    path = write_problems(tmp_path / "p.parquet", load_problems(write_splits(tmp_path / "data")["val"])[:2])
    other = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    settings = RolloutSettings(port=0, backend="vllm", max_model_len=32, reward_workers=0)
    servicer = RolloutServicer(settings)
    server, _, port = create_server(settings, servicer)
    server.start()
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            for i, ckpt in enumerate((tiny_model_dir, other, other)):
                req = rollout_pb2.GenerateRequest(
                    request_id=f"r{i}", checkpoint=str(ckpt), problems_path=str(path), output_path=str(tmp_path / f"{i}.parquet"),
                    sampling=common_pb2.SamplingParams(n=1, max_tokens=2, temperature=1.0, seed=0),
                )
                list(rollout_pb2_grpc.RolloutServiceStub(ch).Generate(req))
    finally:
        server.stop(0)
        servicer.close()
    gained = {n: metric(f"gradalign_rollout_{n}") - before[n] for n in names}
    assert gained["model_loads_total"] == 1 and gained["weight_swaps_total"] == 1 and gained["swap_failures_total"] == 0
    assert gained["weight_swap_seconds_total"] > 0


def test_service_with_the_vllm_backend_logic(fake_vllm, tiny_model_dir, tmp_path):
    from gradalign_common.grpc_utils import channel
    from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
    from gradalign_common.records import read_rollouts, write_problems
    from services.rollout.server import create_server

    problems = load_problems(write_splits(tmp_path / "data")["val"])[:5]
    path = write_problems(tmp_path / "p.parquet", problems)
    server, _, port = create_server(RolloutSettings(port=0, backend="vllm", max_model_len=32, batch_size=2, reward_workers=0))
    server.start()
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            req = rollout_pb2.GenerateRequest(
                request_id="r", checkpoint=str(tiny_model_dir), problems_path=str(path), output_path=str(tmp_path / "o.parquet"),
                sampling=common_pb2.SamplingParams(n=2, max_tokens=2, temperature=1.0, seed=0),
            )
            events = list(rollout_pb2_grpc.RolloutServiceStub(ch).Generate(req))
    finally:
        server.stop(0)
    assert [e.progress.done for e in events[:-1]] == [2, 4, 5]
    records = read_rollouts(events[-1].result.output_path)
    assert [r.problem_id for r in records] == [p.problem_id for p in problems for _ in range(2)]
    assert all(r.response_ids[0] == r.prompt_ids[-1] and r.finish_reason == "length" for r in records)


# --- the hf backend ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arith_train(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("arith"))["train"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, arith_train):
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    problems = load_problems(arith_train)[:24]
    ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in problems])
    return model, tokenizer, ids


def test_length_sorted_batches():
    assert length_sorted_batches([1, 3, 2, 3], 3) == [[1, 3, 2], [0]]
    assert length_sorted_batches([1, 3, 2], 2, sort_by_length=False) == [[0, 1], [2]]


def test_hf_backend_is_deterministic_for_a_seed(tiny_model_dir, tiny):
    _, _, ids = tiny
    backend = create_backend(RolloutSettings(batch_size=8))
    backend.load(str(tiny_model_dir))
    sampling = Sampling(n=4, max_tokens=6, temperature=1.0, seed=11)
    a = backend.generate(ids, sampling)
    b = backend.generate(ids, sampling)
    c = backend.generate(ids, Sampling(n=4, max_tokens=6, temperature=1.0, seed=12))
    assert a == b and a != c
    assert len(a) == len(ids) and all(len(s) == 4 for s in a)
    for samples in a:
        for s in samples:
            assert 1 <= len(s.token_ids) <= 6 and s.finish_reason in ("stop", "length")
            assert (s.finish_reason == "stop") == (s.token_ids[-1] == backend.tokenizer.eos_token_id)


def test_batched_greedy_matches_one_call_per_response(tiny):
    model, tokenizer, ids = tiny
    greedy = Sampling(n=1, max_tokens=6, temperature=0.0)
    batched = sample_responses(model, tokenizer, ids, greedy, batch_size=7)  # mixed lengths, left padding
    assert batched == sample_responses_unbatched(model, tokenizer, ids, greedy)
    assert sample_responses(model, tokenizer, ids, greedy, batch_size=7, sort_by_length=False) == batched


def test_stop_strings_cut_the_response(tiny):
    _, tokenizer, _ = tiny
    row = tokenizer("12+34=5", add_special_tokens=False)["input_ids"]
    ids, reason = cut_response(row, tokenizer.eos_token_id, tokenizer, stop=("+3",))
    assert tokenizer.decode(ids) == "12+3" and reason == "stop"
    ids, reason = cut_response(row + [tokenizer.eos_token_id, 7], tokenizer.eos_token_id, tokenizer)
    assert ids == row + [tokenizer.eos_token_id] and reason == "stop"
    assert cut_response(row, tokenizer.eos_token_id, tokenizer, stop=("zz",)) == (row, "length")


def test_generate_rollouts_for_the_trainer(tiny, arith_train):
    from gradalign_common.generation import generate_rollouts
    from gradalign_common.rewards import compute_reward

    model, tokenizer, _ = tiny
    problems = load_problems(arith_train)[:10]
    seen = []
    sampling = Sampling(n=3, max_tokens=4, temperature=1.0, seed=5)
    records = generate_rollouts(model, tokenizer, problems, sampling, batch_size=4, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    assert [r.problem_id for r in records] == [p.problem_id for p in problems for _ in range(3)]
    by_id = {p.problem_id: p for p in problems}
    for r in records:
        assert (r.reward, r.correct) == compute_reward("arith", r.text, by_id[r.problem_id].ground_truth)
        assert r.text == tokenizer.decode(list(r.response_ids), skip_special_tokens=True)
    assert generate_rollouts(model, tokenizer, problems, sampling, batch_size=4) == records
