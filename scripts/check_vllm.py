#!/usr/bin/env python
"""Check the rollout service's vllm backend on a GPU machine (the `gpu` extra: vllm) or on CPU
(vLLM's CPU build, `make vllm-env`).

    python scripts/check_vllm.py [--out-dir DIR] [--tensor-parallel-size 1] [--gpu-memory-utilization 0.3]
    .venv-vllm/bin/python scripts/check_vllm.py --dtype float32 --enforce-eager      # on CPU

It builds the tiny model (with a head size every vLLM attention backend supports, the CPU
one included), then checks:
1. generation: n samples per prompt, token ids in the vocabulary, finish reasons, text matching
   the token ids, deterministic for a seed, different for another seed, a prompt's samples the
   same whichever prompts share the call, stop strings;
2. greedy agreement with the hf backend on the same prompts (reported; bf16 vs fp32 may differ);
3. an in-place weight swap to a perturbed copy of the checkpoint and back (same engine, no failed
   swap, outputs change to the hf backend's on the new checkpoint (checked in float32, reported
   otherwise), then return to the original ones; the swap's seconds reported);
4. the gRPC RolloutService end to end with the vllm backend: a rewarded rollout shard, and the
   load/swap counters on its Prometheus metrics.
Prints one line per check and exits 1 when any fails. The test suite runs the same backend on
CPU (tests/test_vllm_rollout.py); this script is what a lent GPU machine runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checklist import FAILED, check  # noqa: E402 (scripts/ is the script's own folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=None, help="where to build the models (default: a temp dir)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--enforce-eager", action="store_true", help="skip CUDA graph capture (faster start)")
    args = ap.parse_args()

    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm is not installed: pip install 'gradalign[gpu]' (GPU) or make vllm-env (CPU, .venv-vllm)", file=sys.stderr)
        return 2
    import torch

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, cuda: {torch.cuda.is_available()}", flush=True)

    from gradalign_common.datasets import load_problems
    from gradalign_common.generation import Sampling, prompt_token_ids
    from gradalign_common.modeling import resolve_dtype
    from gradalign_common.prompts import render_prompt
    from gradalign_common.records import read_rollouts, write_problems
    from gradalign_common.tiny_model import TinyModelSpec, build_and_save, save_perturbed_copy
    from gradalign_common.tiny_task import write_splits
    from services.rollout.backends import create_backend
    from services.rollout.settings import RolloutSettings

    work = args.out_dir or Path(tempfile.mkdtemp(prefix="gradalign-check-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # head_dim 64 (hidden 128 / 2 heads): supported by every vLLM attention backend, CPU's included
    spec = TinyModelSpec(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=384, warmup_steps=300)
    ckpt = build_and_save(work / "tiny", spec)
    print(f"built the tiny model in {time.perf_counter() - t0:.1f}s at {ckpt}", flush=True)
    problems = load_problems(write_splits(work / "data")["val"])[:16]

    settings = RolloutSettings(
        backend="vllm", dtype=args.dtype, max_model_len=spec.max_positions, batch_size=1024, reward_workers=0,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_enforce_eager=args.enforce_eager,
    )
    backend = create_backend(settings)
    t0 = time.perf_counter()
    tokenizer = backend.load(str(ckpt))
    print(f"vLLM engine up in {time.perf_counter() - t0:.1f}s on {backend.device}", flush=True)
    ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in problems])

    # 1. generation
    sampling = Sampling(n=4, max_tokens=8, temperature=1.0, seed=0)
    a = backend.generate(ids, sampling)
    check("one list of n samples per prompt", len(a) == len(ids) and all(len(s) == 4 for s in a))
    flat = [s for ss in a for s in ss]
    vocab = len(tokenizer)
    check("token ids in the vocabulary", all(0 <= t < vocab for s in flat for t in s.token_ids))
    check("finish reasons", all(s.finish_reason in ("stop", "length") for s in flat), str({s.finish_reason for s in flat}))
    check(
        "length finish means max_tokens", all(len(s.token_ids) == 8 for s in flat if s.finish_reason == "length")
    )
    check(
        "stop finish ends with EOS", all(s.token_ids[-1] == tokenizer.eos_token_id for s in flat if s.finish_reason == "stop")
    )
    mismatched = [s for s in flat if s.text != tokenizer.decode(list(s.token_ids), skip_special_tokens=True)]
    check("text matches token ids", not mismatched, f"{len(mismatched)} differ" if mismatched else "")
    check("deterministic for a seed", backend.generate(ids, sampling) == a)
    check("another seed, other samples", backend.generate(ids, Sampling(n=4, max_tokens=8, temperature=1.0, seed=1)) != a)
    shuffled = backend.generate(ids[8:] + ids[:8][::-1], sampling)  # other neighbours and positions
    check("a prompt's samples do not depend on the other prompts", shuffled[len(ids) - 8 :][::-1] == a[:8])
    stopped = backend.generate(ids[:4], Sampling(n=2, max_tokens=8, temperature=1.0, seed=0, stop=("1",)))
    check(
        "stop strings end the text",
        all(s.finish_reason == "length" or s.text.endswith("1") or s.token_ids[-1] == tokenizer.eos_token_id for ss in stopped for s in ss),
    )

    # 2. greedy agreement with the hf backend
    greedy = Sampling(n=1, max_tokens=8, temperature=0.0)
    v_greedy = backend.generate(ids, greedy)
    hf = create_backend(RolloutSettings(backend="hf", device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32"))
    hf.load(str(ckpt))
    h_greedy = hf.generate(ids, greedy)
    agree = sum(v[0].token_ids == h[0].token_ids for v, h in zip(v_greedy, h_greedy)) / len(ids)
    print(f"INFO  greedy agreement vllm({resolve_dtype(args.dtype, backend.device)}) vs hf(float32): {agree:.0%}", flush=True)
    hf.close()

    # 3. in-place weight swap and back
    # another checkpoint of the same architecture: the weights with seeded noise (the embeddings
    # too: vLLM 0.32's own reload left a tied lm_head computing with the old ones)
    perturbed = save_perturbed_copy(ckpt, work / "tiny-perturbed")
    hf = create_backend(RolloutSettings(backend="hf", device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32"))
    hf.load(str(perturbed))
    h_swapped = hf.generate(ids, greedy)
    hf.close()
    llm_before = backend.llm
    t0 = time.perf_counter()
    backend.load(str(perturbed))
    seconds = time.perf_counter() - t0
    check(
        "swap kept the engine", backend.llm is llm_before and (backend.loads, backend.swaps, backend.swap_failures) == (1, 1, 0),
        f"loads={backend.loads} swaps={backend.swaps} swap_failures={backend.swap_failures}",
    )
    print(f"INFO  in-place swap: {backend.swap_seconds:.3f}s (load() {seconds:.3f}s, engine load {backend.load_seconds:.1f}s)", flush=True)
    z = backend.generate(ids, greedy)
    check("swapped weights change the outputs", z != v_greedy)
    agree = sum(v[0].token_ids == h[0].token_ids for v, h in zip(z, h_swapped)) / len(ids)
    vdtype = resolve_dtype(args.dtype, backend.device)
    if vdtype == "float32":
        check("swapped outputs are the new checkpoint's (hf greedy)", agree == 1.0, f"{agree:.0%}")
    else:
        print(f"INFO  greedy agreement after the swap, vllm({vdtype}) vs hf(float32) on the new checkpoint: {agree:.0%}", flush=True)
    backend.load(str(ckpt))
    check("swapping back restores the outputs", backend.generate(ids, greedy) == v_greedy)
    check("swapped back in place", (backend.loads, backend.swaps, backend.swap_failures) == (1, 2, 0))

    # 4. the gRPC service end to end
    from gradalign_common.grpc_utils import channel
    from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
    from services.rollout.server import RolloutServicer, create_server

    path = write_problems(work / "problems.parquet", problems)
    servicer = RolloutServicer(settings.model_copy(update={"port": 0}), backend=backend)
    server, _, port = create_server(settings.model_copy(update={"port": 0}), servicer)
    server.start()
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            stub = rollout_pb2_grpc.RolloutServiceStub(ch)
            events = {}
            for name, checkpoint in (("rollouts", ckpt), ("rollouts-perturbed", perturbed)):  # the second one swaps
                req = rollout_pb2.GenerateRequest(
                    request_id=f"check/{name}", checkpoint=str(checkpoint), problems_path=str(path),
                    output_path=str(work / f"{name}.parquet"),
                    sampling=common_pb2.SamplingParams(n=8, max_tokens=8, temperature=1.0, top_p=1.0, seed=0),
                )
                events[name] = list(stub.Generate(req))
        result = events["rollouts"][-1].result
        records = read_rollouts(result.output_path)
        check("service wrote the shard", len(records) == len(problems) * 8 == result.n_responses)
        accuracy = sum(r.correct for r in records) / len(records)
        check("rewards computed", all(r.reward in (0.0, 1.0) for r in records), f"accuracy {accuracy:.0%}")
        from prometheus_client import REGISTRY

        exported = {
            k: REGISTRY.get_sample_value(f"gradalign_rollout_{k}_total", {"backend": "vllm"}) or 0.0
            for k in ("model_loads", "weight_swaps", "swap_failures")
        }
        # the servicer took the already loaded backend: its first request loads nothing, its second swaps
        check(
            "service's load/swap counters (Prometheus)",
            exported == {"model_loads": 0.0, "weight_swaps": 1.0, "swap_failures": 0.0}, str(exported),
        )
    finally:
        server.stop(0)
        servicer.close()

    print(f"{'all checks passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)} ({work})")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
