"""Reading VERL-style problem records from local JSONL or parquet files, and importing them.

A record: {"prompt": [{"role": "user", "content": ...}] (or a string), "data_source": str,
"reward_model": {"ground_truth": ...}, "extra_info": {"index": ...}}. The problem id is
extra_info.index when present, else the record's position. Errors name the file, the
record and the field. `import_dataset` writes one normalised parquet from one file or a mix
of several (docs/datasets.md); nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.artifacts import atomic_write_bytes
from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.prompts import encode_messages, normalize_messages, render_prompt
from gradalign_common.records import PROBLEM_SCHEMA, Problem, write_problems
from gradalign_common.rewards import get_reward_fn


def problem_from_record(record: dict, position: int, where: str) -> Problem:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected a JSON object")
    if "prompt" not in record:
        raise InvalidInputError(f"{where}: missing field 'prompt'")
    messages = normalize_messages(record["prompt"], f"{where}: prompt")
    data_source = record.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        raise InvalidInputError(f"{where}: missing field 'data_source'")
    try:
        get_reward_fn(data_source)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise InvalidInputError(f"{where}: missing field 'reward_model.ground_truth'")
    extra = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else {}
    index = extra.get("index", position)
    return Problem(
        problem_id=str(index),
        prompt=encode_messages(messages),
        data_source=data_source,
        ground_truth=str(reward_model["ground_truth"]),
    )


def load_problems(path: str | Path) -> list[Problem]:
    """Problems from a .jsonl/.json-lines or .parquet file of VERL records; never empty, ids unique."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFoundError(f"dataset file not found: {p}")
    if not p.is_file():
        raise InvalidInputError(f"dataset path is not a file: {p}")
    if p.suffix == ".parquet":
        try:
            table = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidInputError(f"{p}: not a readable parquet file ({exc})") from None
        if set(table.column_names) == set(PROBLEM_SCHEMA.names):  # already normalised (import_dataset's output)
            problems = [Problem(**{k: row[k] for k in PROBLEM_SCHEMA.names}) for row in table.to_pylist()]
            for prob in problems:
                get_reward_fn(prob.data_source)
        else:
            problems = [problem_from_record(r, i, f"{p} row {i}") for i, r in enumerate(table.to_pylist())]
    elif p.suffix in (".jsonl", ".json"):
        problems = []
        with p.open() as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                problems.append(problem_from_record(record, len(problems), f"{p}:{lineno}"))
    else:
        raise InvalidInputError(f"{p}: unsupported dataset format {p.suffix!r}; use .jsonl or .parquet")
    if not problems:
        raise InvalidInputError(f"{p}: the dataset is empty")
    seen: set[str] = set()
    for prob in problems:
        if prob.problem_id in seen:
            raise InvalidInputError(f"{p}: duplicate problem id {prob.problem_id!r} (extra_info.index)")
        seen.add(prob.problem_id)
    return problems


# --- importing (and mixing) datasets into one normalised parquet --------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ImportProgress = Callable[[int, int, str], None]  # (steps done, steps total, what was just done)


def import_dataset(
    paths_with_counts: Sequence[tuple[str | Path, int | None]],
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer=None,
    progress: ImportProgress | None = None,
) -> dict[str, Any]:
    """Read VERL-style records from local parquet/JSONL files, take `count` problems from each
    (None or 0: all of it; fewer: a random sample for `seed`), and write them as one parquet of
    normalised problem records (problem_id, prompt as JSON chat messages, data_source,
    ground_truth) to out_dir/NAME.parquet, plus its metadata to out_dir/NAME.json, both atomically.

    One file keeps its order; several are mixed (shuffled together for `seed`), like the
    reference's mix.py. Problem ids are the records' extra_info.index; when ids collide across
    files every id becomes "<k>-<id>" (k: the file's position). With a tokenizer (object or model
    directory) the metadata records prompt lengths in tokens, the chat template applied when the
    tokenizer has one. Nothing is downloaded. Returns the metadata.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInputError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    inputs = [(Path(p).expanduser(), c) for p, c in paths_with_counts]
    if not inputs:
        raise InvalidInputError("no dataset files given")
    for path, count in inputs:
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise InvalidInputError(f"{path}: count must be a non-negative integer (0: all), got {count!r}")
    if isinstance(tokenizer, (str, Path)):
        from gradalign_common.modeling import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    steps = len(inputs) + 1
    chosen: list[list[Problem]] = []
    sources = []
    for k, (path, count) in enumerate(inputs):
        problems = load_problems(path)
        available = len(problems)
        if count and count > len(problems):
            raise InvalidInputError(f"{path}: asked for {count} problems but the file has {len(problems)}")
        if count and count < len(problems):
            keep = sorted(random.Random(f"{seed}:{k}").sample(range(len(problems)), count))
            problems = [problems[i] for i in keep]
        chosen.append(problems)
        sources.append(
            {
                "path": str(path.resolve()),
                "sha256": _sha256(path),
                "available": available,
                "selected": len(problems),
                "data_sources": dict(Counter(p.data_source for p in problems)),
            }
        )
        if progress:
            progress(k + 1, steps, f"read {path.name}")
    all_ids = [p.problem_id for ps in chosen for p in ps]
    prefixed = len(set(all_ids)) != len(all_ids)
    if prefixed:
        chosen = [[dataclasses.replace(p, problem_id=f"{k}-{p.problem_id}") for p in ps] for k, ps in enumerate(chosen)]
    mixed = [p for ps in chosen for p in ps]
    if len(inputs) > 1:
        random.Random(seed).shuffle(mixed)
    out = Path(out_dir).expanduser()
    path = write_problems(out / f"{name}.parquet", mixed)
    metadata: dict[str, Any] = {
        "name": name,
        "path": str(path.resolve()),
        "n_problems": len(mixed),
        "seed": seed,
        "mixed": len(inputs) > 1,
        "ids_prefixed": prefixed,
        "data_sources": dict(Counter(p.data_source for p in mixed)),
        "sources": sources,
        "sha256": _sha256(path),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if tokenizer is not None:
        lengths = [len(x) for x in _prompt_lengths(tokenizer, mixed)]
        metadata["prompt_tokens"] = {
            "min": min(lengths),
            "mean": round(statistics.fmean(lengths), 2),
            "max": max(lengths),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        }
    atomic_write_bytes(out / f"{name}.json", (json.dumps(metadata, indent=2) + "\n").encode())
    if progress:
        progress(steps, steps, f"wrote {path.name}")
    return metadata


def _prompt_lengths(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    texts = [render_prompt(p.prompt, tokenizer) for p in problems]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
