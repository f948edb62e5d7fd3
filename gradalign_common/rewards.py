"""Reward functions keyed by data_source, like verl's default reward function.

`compute_reward(data_source, response_text, ground_truth)` returns (reward, correct) for one
response; `score_batch(items, judge=...)` scores many at once, sending the items whose data
source is judged by a model to the judge in one concurrent batch and, optionally, the math
items to a process pool (math-verify's timeouts only work in a process's main thread).

Reward types (data sources in brackets, see docs/datasets.md):
- math: `math-verify` extracts the final answer (\\boxed{} first, then the last
  expression) and checks symbolic or numeric equivalence with the reference
  [math, math500, aime, aime24, aime25, amc, amc22, amc23, gsm8k, deepscaler, dapo,
  metamath, theoremqa, webinstruct, ...].
- multiple choice: the chosen letter [mmlupro, supergpqa, mc].
- yes/no: [strategyqa, yesno].
- exact match [exact_match] and the built-in arithmetic task [arith].
- model judge [judge, model_judge, plus any data source a service routes to its judge]:
  gradalign_common.judge asks an OpenAI-compatible chat endpoint.

A new reward is one pure function registered with `@register_reward("name", ...)`.
"""

from __future__ import annotations

import functools
import re
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

from gradalign_common.errors import InvalidInputError
from gradalign_common.registry import Registry

RewardFn = Callable[[str, str], float]
_REGISTRY: Registry[RewardFn] = Registry("data_source", "data sources")
_HEAVY: set[str] = set()  # data sources whose reward may be slow (math-verify): eligible for a process pool
_JUDGED: set[str] = set()  # data sources always scored by a model judge

MATH_DATA_SOURCES = (
    "math", "math500", "math_dapo", "aime", "aime24", "aime25", "amc", "amc22", "amc23", "gsm8k",
    "deepscaler", "dapo", "metamath", "theoremqa", "webinstruct", "olympiadbench", "minerva",
)  # fmt: skip
MULTIPLE_CHOICE_DATA_SOURCES = ("mmlupro", "mmlu_pro", "supergpqa", "gpqa", "mc", "multiple_choice")
YES_NO_DATA_SOURCES = ("strategyqa", "yesno")
JUDGE_DATA_SOURCES = ("judge", "model_judge")

MATH_TIMEOUT_S = 5


@dataclass(frozen=True)
class RewardItem:
    """One response to score; prompt (the problem's text) is only used by a model judge."""

    data_source: str
    response: str
    ground_truth: str
    prompt: str = ""


class BatchJudge(Protocol):
    def score(self, items: Sequence[RewardItem]) -> list[float]: ...


def register_reward(*data_sources: str, heavy: bool = False) -> Callable[[RewardFn], RewardFn]:
    def decorator(fn: RewardFn) -> RewardFn:
        for name in data_sources:
            _REGISTRY.add(name, fn, replace=True)
            (_HEAVY.add if heavy else _HEAVY.discard)(name)
            _JUDGED.discard(name)
        return fn

    return decorator


def register_judged(*data_sources: str) -> None:
    """Data sources scored only by a model judge (score_batch with a judge)."""
    for name in data_sources:
        _REGISTRY.add(name, functools.partial(_needs_judge, name), replace=True)
        _JUDGED.add(name)
        _HEAVY.discard(name)


def _needs_judge(data_source: str, response: str, ground_truth: str) -> float:  # noqa: ARG001
    raise JudgeRequiredError(data_source)


class JudgeRequiredError(InvalidInputError):
    def __init__(self, data_source: str):
        super().__init__(
            f"data_source {data_source!r} is scored by a model judge, but none is configured "
            "(set GRADALIGN_ROLLOUT_JUDGE_BASE_URL and GRADALIGN_ROLLOUT_JUDGE_MODEL)"
        )
        self.data_source = data_source


def reward_names() -> list[str]:
    return _REGISTRY.names()


def get_reward_fn(data_source: str) -> RewardFn:
    return _REGISTRY.get(data_source)


def is_judged(data_source: str, judge_sources: Iterable[str] = ()) -> bool:
    return data_source in _JUDGED or data_source in set(judge_sources)


def is_heavy(data_source: str) -> bool:
    """Whether the data source's reward may be slow (math-verify): worth a process pool."""
    return data_source in _HEAVY


def compute_reward(data_source: str, response_text: str, ground_truth: str) -> tuple[float, bool]:
    reward = float(get_reward_fn(data_source)(response_text, ground_truth))
    return reward, reward > 0.5


def score_batch(
    items: Sequence[RewardItem],
    judge: BatchJudge | None = None,
    judge_sources: Iterable[str] = (),
    pool: Executor | None = None,
) -> list[tuple[float, bool]]:
    """(reward, correct) per item, in order. Judged items go to `judge` in one batch (it runs them
    concurrently); heavy (math) items go to `pool` when one is given. Judge errors propagate."""
    judge_sources = set(judge_sources)
    for item in items:
        get_reward_fn(item.data_source)  # unknown data sources fail before any work
    judged = [i for i, it in enumerate(items) if is_judged(it.data_source, judge_sources)]
    if judged and judge is None:
        raise JudgeRequiredError(items[judged[0]].data_source)
    rewards: list[float] = [0.0] * len(items)
    judged_set = set(judged)
    rest = [i for i in range(len(items)) if i not in judged_set]
    pooled = [i for i in rest if items[i].data_source in _HEAVY] if pool is not None else []
    if pooled:
        args = [(items[i].data_source, items[i].response, items[i].ground_truth) for i in pooled]
        for i, r in zip(pooled, pool.map(_score_tuple, args, chunksize=max(1, len(pooled) // 64))):
            rewards[i] = r
    pooled_set = set(pooled)
    for i in rest:
        if i not in pooled_set:
            rewards[i] = float(get_reward_fn(items[i].data_source)(items[i].response, items[i].ground_truth))
    if judged:
        scores = judge.score([items[i] for i in judged])
        if len(scores) != len(judged):
            raise RuntimeError(f"model judge returned {len(scores)} scores for {len(judged)} items")
        for i, r in zip(judged, scores):
            rewards[i] = float(r)
    return [(float(r), float(r) > 0.5) for r in rewards]


def _score_tuple(args: tuple[str, str, str]) -> float:
    data_source, response, ground_truth = args
    return float(get_reward_fn(data_source)(response, ground_truth))


# --- the built-in arithmetic task and exact match -------------------------------------------

_INT_RE = re.compile(r"^\s*(-?\d+)")


@register_reward("arith")
def arithmetic_reward(response: str, ground_truth: str) -> float:
    """1 when the response starts with the right integer (and nothing but whitespace follows), else 0."""
    match = _INT_RE.match(response)
    if not match or response[match.end() :].strip():
        return 0.0
    return 1.0 if int(match.group(1)) == int(ground_truth) else 0.0


@register_reward("exact_match")
def exact_match_reward(response: str, ground_truth: str) -> float:
    """1 when the response equals the reference up to surrounding and repeated whitespace."""
    return 1.0 if " ".join(response.split()) == " ".join(ground_truth.split()) else 0.0


# --- math answers via math-verify -----------------------------------------------------------


def _math_timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread; elsewhere
    # (gRPC handler threads) it would silently fail every parse, so run without its timeout there
    # (the rollout service can use a process pool of workers whose main thread has timeouts).
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str, timeout: int | None):
    from math_verify import parse

    text = ground_truth.strip()
    if "$" not in text and "\\boxed" not in text:
        text = "\\boxed{" + text + "}"
    return parse(text, parsing_timeout=timeout)


_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


@register_reward(*MATH_DATA_SOURCES, heavy=True)
def math_reward(response: str, ground_truth: str) -> float:
    """1 when the response's final answer (\\boxed{} first, else the last expression) is equivalent
    to the reference per math-verify (symbolic or numeric), else 0. Boolean references (TheoremQA's
    True/False) are compared as yes/no answers."""
    if ground_truth.strip().lower() in _BOOL_WORDS:
        return yes_no_reward(response, ground_truth)
    from math_verify import parse, verify

    timeout = _math_timeout()
    gold = _parse_gold(ground_truth, timeout)
    if not gold:
        return exact_match_reward(_last_boxed(response) or response, ground_truth)
    answer = parse(response, parsing_timeout=timeout)
    if not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=timeout) else 0.0


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def _strip_latex_wrappers(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _TEXT_WRAP_RE.sub(r"\1", s)
    return s.strip().strip("$").strip()


# --- multiple choice and yes/no -------------------------------------------------------------

_LETTER_ONLY_RE = re.compile(r"^\(?\s*([A-Z])\s*\)?[.:]?$")
_ANSWER_LETTER_RE = re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?[:\s]*\(?\*{0,2}([A-Z])\b\)?", re.IGNORECASE)
_PAREN_LETTER_RE = re.compile(r"\(([A-Z])\)")
_GOLD_LETTER_RE = re.compile(r"^\s*\(?([A-Za-z])\s*(?:\)|\.|:|$)")


def extract_choice(response: str) -> str | None:
    """The letter a response chooses: \\boxed{C}, 'answer is (C)' / 'Answer: C', a bare 'C', else the last '(C)'."""
    boxed = _last_boxed(response)
    if boxed is not None:
        m = _LETTER_ONLY_RE.match(_strip_latex_wrappers(boxed))
        if m:
            return m.group(1)
    matches = [m for m in _ANSWER_LETTER_RE.finditer(response) if m.group(1).isupper()]
    if matches:
        return matches[-1].group(1)
    m = _LETTER_ONLY_RE.match(_strip_latex_wrappers(response.strip()))
    if m:
        return m.group(1)
    parens = _PAREN_LETTER_RE.findall(response)
    return parens[-1] if parens else None


@register_reward(*MULTIPLE_CHOICE_DATA_SOURCES)
def multiple_choice_reward(response: str, ground_truth: str) -> float:
    """1 when the chosen letter equals the reference letter ("C", "(C)" or "C. text"), else 0."""
    gold = _GOLD_LETTER_RE.match(ground_truth)
    if not gold:
        return exact_match_reward(_last_boxed(response) or response, ground_truth)
    return 1.0 if extract_choice(response) == gold.group(1).upper() else 0.0


_YES_NO_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def extract_yes_no(response: str) -> bool | None:
    """The boolean a response answers: \\boxed{yes}, else the last yes/no/true/false word."""
    boxed = _last_boxed(response)
    if boxed is not None:
        word = _strip_latex_wrappers(boxed).lower().rstrip(".")
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word]
    words = _YES_NO_RE.findall(response)
    return _BOOL_WORDS[words[-1].lower()] if words else None


@register_reward(*YES_NO_DATA_SOURCES)
def yes_no_reward(response: str, ground_truth: str) -> float:
    """1 when the response's yes/no (true/false) answer equals the reference's, else 0."""
    gold = _BOOL_WORDS.get(ground_truth.strip().lower().rstrip("."))
    if gold is None:
        return 0.0
    return 1.0 if extract_yes_no(response) is gold else 0.0


register_judged(*JUDGE_DATA_SOURCES)
