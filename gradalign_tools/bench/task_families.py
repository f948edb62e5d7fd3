"""Built-in task families for the tiny model: the arithmetic task extended to several problem types.

Each problem type is a finite, deterministic set of distinct (prompt, answer) pairs:

| type       | prompt     | answer          | what it is for                                         |
|------------|------------|-----------------|--------------------------------------------------------|
| add1       | "87+6="    | "93"            | easy: a number 0-199 plus one digit                    |
| add2       | "37+45="   | "82"            | the useful core task: two two-digit operands 10-49     |
| sub        | "45-17="   | "28"            | harder: a - b with 10 <= a <= 49, 0 <= b <= a          |
| mul        | "23*7="    | "161"           | harder: a number 0-99 times a digit 2-9                |
| copy       | "374="     | "374"           | trivial: repeat the number                             |
| unsolvable | "37?45="   | a random number | no rule gives the answer (a seeded random target)      |
| malformed  | "37++45=", "+45=", "37+" ... | a random number | garbled prompts: no right answer       |

`make_family(seed, test=..., val=..., pool=...)` splits every type it is asked for into
disjoint held-out test, trusted validation and pool parts (a seeded shuffle per type), and
builds VERL-style records that carry the type in `extra_info.type`. Pool records can be made
noisy: their `data_source` names a noisy reward (gradalign_tools.bench.noisy_rewards) and
`extra_info.noisy` is true. Validation and test records always use the correct reward
("arith"). Everything is a pure function of its arguments.

`warm_start_families` is the supervised warm start of the tiny model (as
gradalign_common.tiny_model.warm_start) over a mixture of types, never touching the test or
validation problems.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from gradalign_tools.bench import noisy_rewards  # noqa: F401 - registers the noisy data sources
from gradalign_common.datasets import problem_from_record
from gradalign_common.errors import InvalidInputError
from gradalign_common.records import Problem
from gradalign_common.tiny_model import supervised_step

CORRECT_SOURCE = "arith"


@dataclass(frozen=True)
class ProblemType:
    name: str
    category: str  # useful | easy | trivial | unsolvable | malformed
    description: str
    instances: Callable[[], list[tuple[str, str]]]


def _random_target(key: str, low: int = 0, high: int = 199) -> str:
    """A fixed pseudo-random integer for `key`: an answer no arithmetic rule produces."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return str(low + h % (high - low + 1))


def _add1() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(200) for b in range(10)]


def _add2() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(10, 50) for b in range(10, 50)]


def _sub() -> list[tuple[str, str]]:
    return [(f"{a}-{b}=", str(a - b)) for a in range(10, 50) for b in range(0, a + 1)]


def _mul() -> list[tuple[str, str]]:
    return [(f"{a}*{d}=", str(a * d)) for a in range(100) for d in range(2, 10)]


def _copy() -> list[tuple[str, str]]:
    return [(f"{n}=", str(n)) for n in range(1000)]


def _unsolvable() -> list[tuple[str, str]]:
    return [(f"{a}?{b}=", _random_target(f"unsolvable:{a}?{b}")) for a in range(10, 50) for b in range(10, 50)]


_MALFORMED_SHAPES = ("{a}++{b}=", "+{b}=", "{a}+", "={a}+{b}", "{a}+{b}==", "{a}=+{b}", "{a}{b}+=")


def _malformed() -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for shape in _MALFORMED_SHAPES:
        for a in range(10, 50):
            for b in range(10, 50):
                prompt = shape.format(a=a, b=b)
                if prompt not in seen:
                    seen[prompt] = _random_target(f"malformed:{prompt}")
    return list(seen.items())


PROBLEM_TYPES: dict[str, ProblemType] = {
    t.name: t
    for t in (
        ProblemType("add1", "easy", "a number 0-199 plus one digit", _add1),
        ProblemType("add2", "useful", "two-digit addition, operands 10-49", _add2),
        ProblemType("sub", "useful", "subtraction a - b, 10 <= a <= 49, 0 <= b <= a", _sub),
        ProblemType("mul", "useful", "a number 0-99 times a digit 2-9", _mul),
        ProblemType("copy", "trivial", "repeat a number 0-999", _copy),
        ProblemType("unsolvable", "unsolvable", "an unknown operator with a random target", _unsolvable),
        ProblemType("malformed", "malformed", "a garbled addition prompt with a random target", _malformed),
    )
}
USELESS_CATEGORIES = ("trivial", "unsolvable", "malformed")


def get_type(name: str) -> ProblemType:
    try:
        return PROBLEM_TYPES[name]
    except KeyError:
        raise InvalidInputError(f"unknown problem type {name!r}; known: {', '.join(PROBLEM_TYPES)}") from None


def instances(name: str) -> list[tuple[str, str]]:
    """All distinct (prompt, answer) pairs of a type, in a fixed order."""
    return _instances_cached(name)


_CACHE: dict[str, list[tuple[str, str]]] = {}


def _instances_cached(name: str) -> list[tuple[str, str]]:
    if name not in _CACHE:
        _CACHE[name] = get_type(name).instances()
    return _CACHE[name]


# --- records -----------------------------------------------------------------------------------


def make_record(
    prompt: str, answer: str, *, index: str, split: str, ptype: str, data_source: str = CORRECT_SOURCE
) -> dict:
    """A VERL-style record carrying its type (extra_info.type) and whether its reward is noisy."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "data_source": data_source,
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "index": index,
            "split": split,
            "type": ptype,
            "category": get_type(ptype).category,
            "noisy": data_source != CORRECT_SOURCE,
        },
    }


def to_problem(record: dict) -> Problem:
    return problem_from_record(record, 0, f"{record['extra_info']['split']} record {record['extra_info']['index']}")


@dataclass(frozen=True)
class Noise:
    """Which pool records get a noisy reward: a `rate` of the pool problems of `types` (all types
    when empty), their data_source drawn from `rewards` (name -> weight)."""

    rate: float = 0.0
    rewards: Mapping[str, float] = field(default_factory=lambda: {"arith_inverted": 1.0})
    types: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise InvalidInputError(f"noise rate must be in [0, 1], got {self.rate}")
        if self.rate > 0 and (not self.rewards or any(w < 0 for w in self.rewards.values()) or sum(self.rewards.values()) <= 0):
            raise InvalidInputError("noise rewards must be a non-empty mapping of data sources to weights >= 0")
        for t in self.types:
            get_type(t)


@dataclass(frozen=True)
class Family:
    """A seeded instance of the task family: records per split and type-level metadata."""

    seed: int
    test: dict[str, list[dict]]  # type -> records
    val: list[dict]
    pool: list[dict]  # in the pool's (shuffled) order
    held_out: frozenset[str]  # prompts of test and validation problems (the warm start skips them)

    def test_problems(self) -> dict[str, list[Problem]]:
        return {t: [to_problem(r) for r in recs] for t, recs in self.test.items()}

    def val_problems(self) -> list[Problem]:
        return [to_problem(r) for r in self.val]

    def pool_problems(self) -> list[Problem]:
        return [to_problem(r) for r in self.pool]

    def pool_info(self) -> dict[str, dict]:
        """problem_id -> {"type", "category", "noisy", "data_source"} for the pool."""
        return {
            str(r["extra_info"]["index"]): {
                "type": r["extra_info"]["type"],
                "category": r["extra_info"]["category"],
                "noisy": r["extra_info"]["noisy"],
                "data_source": r["data_source"],
            }
            for r in self.pool
        }


def _counts(total: int, mixture: Mapping[str, float]) -> dict[str, int]:
    """Split `total` over the mixture's types in proportion to their weights (largest remainders)."""
    weights = {t: float(w) for t, w in mixture.items() if float(w) > 0}
    if not weights:
        raise InvalidInputError("a mixture needs at least one type with a positive weight")
    s = sum(weights.values())
    exact = {t: total * w / s for t, w in weights.items()}
    counts = {t: int(v) for t, v in exact.items()}
    rest = total - sum(counts.values())
    for t in sorted(weights, key=lambda t: (-(exact[t] - counts[t]), t))[:rest]:
        counts[t] += 1
    return counts


TEST_RESERVE = 200  # per type: the first 200 of a type's seeded shuffle are test problems
VAL_RESERVE = 64  # the next 64 are validation problems; the rest is the pool's (and the warm start's)


def split_type(name: str, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(test reserve, validation reserve, rest) of a type for `seed`: a seeded shuffle cut at fixed
    sizes, so the held-out problems depend only on (type, seed), not on how many a config uses."""
    items = list(instances(name))
    random.Random(f"task-family:{seed}:{name}").shuffle(items)
    cut = TEST_RESERVE + VAL_RESERVE
    return items[:TEST_RESERVE], items[TEST_RESERVE:cut], items[cut:]


def held_out_prompts(seed: int) -> frozenset[str]:
    """Prompts of every type's test and validation reserves for `seed` (never trained on by the warm start)."""
    out: set[str] = set()
    for t in PROBLEM_TYPES:
        test, val, _ = split_type(t, seed)
        out.update(p for p, _ in test + val)
    return frozenset(out)


def make_family(
    seed: int,
    *,
    test: Mapping[str, int],
    val: Mapping[str, int],
    pool_size: int,
    pool_mixture: Mapping[str, float],
    noise: Noise = Noise(),
) -> Family:
    """Disjoint test / validation / pool problems per type, deterministic for `seed`.

    test and val give the number of problems per type (at most TEST_RESERVE and VAL_RESERVE,
    taken from the type's reserves); the pool has `pool_size` problems drawn from the rest of
    the types of `pool_mixture` in proportion to the weights, shuffled. A `noise.rate` fraction
    of the pool problems of `noise.types` (every pool type when empty) gets a noisy reward;
    which ones is seeded too.
    """
    noise.validate()
    for t in (*test, *val, *pool_mixture):
        get_type(t)
    pool_counts = _counts(pool_size, pool_mixture) if pool_size else {}
    test_records: dict[str, list[dict]] = {}
    val_records: list[dict] = []
    pool_records: list[dict] = []
    for t in PROBLEM_TYPES:
        n_test, n_val, n_pool = int(test.get(t, 0)), int(val.get(t, 0)), pool_counts.get(t, 0)
        if not (n_test or n_val or n_pool):
            continue
        if n_test > TEST_RESERVE or n_val > VAL_RESERVE:
            raise InvalidInputError(
                f"problem type {t!r}: at most {TEST_RESERVE} test and {VAL_RESERVE} validation problems, "
                f"asked for {n_test} and {n_val}"
            )
        test_items, val_items, rest = split_type(t, seed)
        if n_pool > len(rest):
            raise InvalidInputError(
                f"problem type {t!r} has {len(rest)} problems outside its test and validation reserves; "
                f"the pool asks for {n_pool}"
            )
        if n_test:
            test_records[t] = [
                make_record(p, a, index=f"test-{t}-{i}", split="test", ptype=t) for i, (p, a) in enumerate(test_items[:n_test])
            ]
        val_records += [
            make_record(p, a, index=f"val-{t}-{i}", split="val", ptype=t) for i, (p, a) in enumerate(val_items[:n_val])
        ]
        pool_records += [
            make_record(p, a, index=f"pool-{t}-{i}", split="pool", ptype=t) for i, (p, a) in enumerate(rest[:n_pool])
        ]
    rng = random.Random(f"task-family-pool:{seed}")
    rng.shuffle(pool_records)
    if noise.rate > 0:
        eligible = [i for i, r in enumerate(pool_records) if not noise.types or r["extra_info"]["type"] in noise.types]
        n_noisy = round(noise.rate * len(eligible))
        chosen = sorted(rng.sample(eligible, n_noisy))
        sources = sorted(noise.rewards)
        weights = [float(noise.rewards[s]) for s in sources]
        for i in chosen:
            r = pool_records[i]
            source = rng.choices(sources, weights)[0]
            pool_records[i] = make_record(
                r["prompt"][0]["content"], r["reward_model"]["ground_truth"], index=r["extra_info"]["index"],
                split="pool", ptype=r["extra_info"]["type"], data_source=source,
            )
    return Family(seed, test_records, val_records, pool_records, held_out_prompts(seed))


# --- warm start ----------------------------------------------------------------------------------


def warm_start_families(
    model,
    tokenizer,
    mixture: Mapping[str, float],
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    exclude: Iterable[str] = (),
    callback: Callable[[int], bool | None] | None = None,
) -> float:
    """Supervised pass on prompt -> answer<eos> (loss on the answer only) over the mixture's types,
    each batch item's type drawn by weight; prompts in `exclude` are never used. Returns the last
    loss. `callback(step)` is called after each step (1-based); a true return ends the warm start
    there. Same recipe as gradalign_common.tiny_model.warm_start (AdamW, 30-step linear warm-up)."""
    rng = random.Random(f"warm-start:{seed}")
    torch.manual_seed(seed)
    excluded = set(exclude)
    types = sorted(t for t, w in mixture.items() if float(w) > 0)
    if not types:
        raise InvalidInputError("the warm-start mixture needs at least one type with a positive weight")
    weights = [float(mixture[t]) for t in types]
    data = {t: [(p, a) for p, a in instances(t) if p not in excluded] for t in types}
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        batch = [rng.choice(data[t]) for t in rng.choices(types, weights, k=batch_size)]
        loss_value = supervised_step(model, tokenizer, batch, opt, sched)
        if callback is not None and callback(step + 1):
            break
    model.eval()
    return loss_value


def type_counts(problem_ids: Sequence[str], info: Mapping[str, Mapping]) -> dict[str, int]:
    """How many of the problem ids are of each type (per `Family.pool_info`)."""
    out: dict[str, int] = {}
    for pid in problem_ids:
        t = info[pid]["type"]
        out[t] = out.get(t, 0) + 1
    return out
