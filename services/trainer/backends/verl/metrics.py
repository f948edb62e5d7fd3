"""verl's console metrics as our StepMetrics.

verl's console logger prints one line per step, `step:N - key:value - ...` (possibly
prefixed by Ray's `(TaskRunner pid=...)`); `parse_console_metrics` reads it and
`step_metrics_from_verl` maps verl's keys onto our StepMetrics.
"""

from __future__ import annotations

import re

from services.trainer.grpo import GRPOConfig, StepMetrics

_STEP_LINE = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")
_NUMBER = re.compile(r"^(?:np\.\w+\(|numpy\.\w+\(|tensor\()?\s*([-+]?(?:\d[\d.]*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf|nan))\s*\)?$")


def parse_console_metrics(line: str) -> dict[str, float] | None:
    """The metrics of one verl console line `step:N - key:value - ...` (step included), or None."""
    m = _STEP_LINE.search(line.rstrip("\r\n"))
    if not m:
        return None
    metrics: dict[str, float] = {"step": float(m.group(1))}
    for part in m.group(2).split(" - "):
        key, sep, raw = part.rpartition(":")
        if not sep or not key:
            continue
        number = _NUMBER.match(raw.strip())
        if number:
            metrics[key.strip()] = float(number.group(1))
    return metrics


def step_metrics_from_verl(
    metrics: dict[str, float], config: GRPOConfig, n_gpus: int = 1
) -> StepMetrics | None:
    """Our StepMetrics from one step's verl metrics; None unless it carries a training update.

    loss = actor/pg_loss + kl_coef x actor/kl_loss - entropy_coef x actor/entropy (verl logs
    the terms apart); tokens/s = response tokens of the step / its wall time (timing_s/step),
    else verl's perf/throughput (all tokens per GPU-second) x GPUs.
    """
    if "actor/pg_loss" not in metrics:
        return None
    get = metrics.get
    kl = get("actor/kl_loss", 0.0)
    entropy = get("actor/entropy", 0.0)
    response_length = get("response_length/mean", 0.0)
    seconds = get("timing_s/step", 0.0)
    responses = config.batch_size * config.n_samples
    if seconds > 0:
        tokens_per_second = response_length * responses / seconds
    else:
        tokens_per_second = get("perf/throughput", 0.0) * n_gpus
    return StepMetrics(
        step=int(metrics["step"]),
        loss=metrics["actor/pg_loss"] + config.kl_coef * kl - config.entropy_coef * entropy,
        mean_reward=get("critic/score/mean", get("critic/rewards/mean", 0.0)),
        kl=kl,
        grad_norm=get("actor/grad_norm", 0.0),
        entropy=entropy,
        response_length=response_length,
        tokens_per_second=tokens_per_second,
        clip_fraction=get("actor/pg_clipfrac", 0.0),
    )
