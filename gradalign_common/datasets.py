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


class DatasetTooLarge(InvalidInputError):
    """A dataset exceeds max_rows or max_bytes (the scheduler answers HTTP 413)."""


MAX_NESTING = 32  # deepest nesting of lists/objects a record may have


@dataclasses.dataclass
class ReadBudget:
    """Bounds on what reading datasets may take: rows, decoded bytes and the length of one string
    field (None: unbounded), shared by every file of one import so that a mix is bounded too."""

    max_rows: int | None = None
    max_bytes: int | None = None
    max_field_chars: int | None = None
    rows: int = 0
    bytes: int = 0

    def add_rows(self, n: int, where: str) -> None:
        self.rows += n
        if self.max_rows is not None and self.rows > self.max_rows:
            raise DatasetTooLarge(f"{where}: more than max_dataset_rows={self.max_rows} rows")

    def add_bytes(self, n: int, where: str) -> None:
        self.bytes += n
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            raise DatasetTooLarge(f"{where}: more than max_dataset_bytes={self.max_bytes} bytes once decoded")


def _check_strings(record: Any, where: str, max_chars: int | None) -> None:
    """Every string in the record (keys too): not longer than max_chars, no NUL (PostgreSQL cannot
    store it), no lone surrogate (not encodable as UTF-8); nesting at most MAX_NESTING deep. Iterative."""
    stack: list[tuple[Any, str, int]] = [(record, "", 0)]
    while stack:
        value, field, depth = stack.pop()
        field = field if len(field) <= 200 else field[:200] + "..."  # keys are user input too
        if isinstance(value, str):
            if max_chars is not None and len(value) > max_chars:
                raise InvalidInputError(
                    f"{where}: field {field or 'value'!r} is {len(value)} characters long; at most max_field_chars={max_chars}"
                )
            if "\x00" in value:
                raise InvalidInputError(f"{where}: field {field or 'value'!r} contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInputError(f"{where}: field {field or 'value'!r} contains a lone surrogate (not valid UTF-8)") from None
        elif isinstance(value, (dict, list, tuple)):
            if depth >= MAX_NESTING:
                raise InvalidInputError(f"{where}: nested more than {MAX_NESTING} levels deep")
            if isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(k, str):
                        stack.append((k, f"{field} (a key)" if field else "a key", depth + 1))
                    stack.append((v, f"{field}.{k}" if field else str(k), depth + 1))
            else:
                for i, v in enumerate(value):
                    stack.append((v, f"{field}[{i}]", depth + 1))


def _int_truth(ground_truth: str) -> str | None:
    try:
        int(ground_truth)
    except ValueError:
        return "must be an integer for the arithmetic reward"
    return None


def _yes_no_truth(ground_truth: str) -> str | None:
    from gradalign_common.rewards import _BOOL_WORDS

    if ground_truth.strip().lower().rstrip(".") not in _BOOL_WORDS:
        return "must be yes, no, true or false for the yes/no reward"
    return None


def _ground_truth_checks() -> dict[Callable, Callable[[str], str | None]]:
    """Per reward function (so every data source registered to it), how its reference is checked:
    parsed the way the reward will parse it. Rewards not listed take any non-empty text."""
    from gradalign_common import rewards

    return {rewards.arithmetic_reward: _int_truth, rewards.yes_no_reward: _yes_no_truth}


def check_ground_truth(data_source: str, ground_truth: str, where: str) -> None:
    """InvalidInputError naming reward_model.ground_truth when the data source's reward cannot use it."""
    reward = get_reward_fn(data_source)
    if not ground_truth.strip():
        raise InvalidInputError(f"{where}: field 'reward_model.ground_truth' is empty")
    check = _ground_truth_checks().get(reward)
    problem = check(ground_truth) if check else None
    if problem:
        shown = ground_truth if len(ground_truth) <= 40 else ground_truth[:40] + "..."
        raise InvalidInputError(f"{where}: field 'reward_model.ground_truth' {shown!r} {problem} (data_source {data_source!r})")


def problem_from_record(record: dict, position: int, where: str, max_field_chars: int | None = None) -> Problem:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected a JSON object")
    _check_strings(record, where, max_field_chars)
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
    ground_truth = str(reward_model["ground_truth"])
    check_ground_truth(data_source, ground_truth, where)
    extra = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else {}
    index = extra.get("index", position)
    return Problem(
        problem_id=str(index),
        prompt=encode_messages(messages),
        data_source=data_source,
        ground_truth=ground_truth,
    )


def _normalised_problem(row: dict, where: str, max_field_chars: int | None) -> Problem:
    """A row of an already normalised parquet (import_dataset's output), checked like a record."""
    _check_strings(row, where, max_field_chars)
    for k in PROBLEM_SCHEMA.names:
        if not isinstance(row.get(k), str):
            raise InvalidInputError(f"{where}: field {k!r} must be a string")
    try:
        get_reward_fn(row["data_source"])
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    check_ground_truth(row["data_source"], row["ground_truth"], where)
    return Problem(**{k: row[k] for k in PROBLEM_SCHEMA.names})


_BATCH_TARGET_BYTES = 8 << 20  # about how many decoded bytes one parquet batch may hold
_MIN_BATCH_ROWS = 8  # fewer rows per batch only slows reading down (measured: 2 rows take twice as long)
_DICT_VALUE_CAP = 1 << 20  # largest dictionary value assumed when sizing batches (pyarrow's default dictionary page limit)


def _parquet_batch_rows(meta: pq.FileMetaData, rg: int) -> int:
    """Rows per batch of row group rg so that a batch decodes to about _BATCH_TARGET_BYTES at worst.
    A dictionary-encoded column may repeat its largest entry in every row, so each of its values
    is counted as large as the chunk (up to _DICT_VALUE_CAP): a decompression bomb gets tiny batches.
    An estimate only: the decoded bytes are counted (and bounded) as each batch is read."""
    group = meta.row_group(rg)
    rows = max(1, group.num_rows)
    per_row = 0.0
    for c in range(group.num_columns):
        col = group.column(c)
        size = max(0, col.total_uncompressed_size or 0)
        # a dictionary page may hold up to the whole chunk; pyarrow's writer caps one at 1 MiB (then falls
        # back to plain pages, whose size is honest), so a normal file's batches stay reasonably large
        variable = col.physical_type == "BYTE_ARRAY"  # strings: a fixed-width column's size is honest
        per_row += size / rows + (min(size, _DICT_VALUE_CAP) if col.has_dictionary_page and variable else 0)
    return int(max(_MIN_BATCH_ROWS, min(4096, _BATCH_TARGET_BYTES // max(1.0, per_row))))


def _iter_parquet(p: Path, label: str, budget: ReadBudget):
    """(position, row dict) of a parquet file, read a small batch at a time within the budget."""
    try:
        pf = pq.ParquetFile(p)
        meta = pf.metadata
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"{label}: not a readable parquet file ({exc})") from None
    if budget.max_rows is not None and meta.num_rows > budget.max_rows - budget.rows:
        raise DatasetTooLarge(f"{label}: more than max_dataset_rows={budget.max_rows} rows ({meta.num_rows} in the file)")
    position = 0
    try:
        for rg in range(meta.num_row_groups):
            batches = pf.iter_batches(batch_size=_parquet_batch_rows(meta, rg), row_groups=[rg], use_threads=False)
            for batch in batches:
                budget.add_rows(batch.num_rows, label)
                budget.add_bytes(batch.nbytes, label)
                rows = batch.to_pylist()
                del batch
                for row in rows:
                    yield position, row
                    position += 1
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"{label}: not a readable parquet file ({exc})") from None
    finally:
        pa.default_memory_pool().release_unused()


def _iter_jsonl(p: Path, label: str, budget: ReadBudget):
    """(line number, record) of a JSONL file, a line at a time within the budget; every defect names the line."""
    limit = None if budget.max_bytes is None else budget.max_bytes - budget.bytes + 1
    with p.open("rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(limit) if limit is not None else fh.readline()
            if not raw:
                return
            lineno += 1
            where = f"{label}:{lineno}"
            budget.add_bytes(len(raw), where)
            if limit is not None:
                limit -= len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            budget.add_rows(1, where)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{where}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise InvalidInputError(f"{where}: nested too deeply (at most {MAX_NESTING} levels)") from None
            yield lineno, record


def load_problems(
    path: str | Path,
    *,
    label: str | None = None,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    max_field_chars: int | None = None,
    budget: ReadBudget | None = None,
) -> list[Problem]:
    """Problems from a .jsonl/.json-lines or .parquet file of VERL records; never empty, ids unique.

    Read incrementally (a JSONL line, a small parquet batch at a time); every string of every record
    is checked (length at most max_field_chars, no NUL, valid UTF-8, nesting bounded) and every
    ground truth against its data source's reward. More than max_rows rows or max_bytes decoded
    bytes (or a shared `budget`'s) is a DatasetTooLarge. Errors name the file as `label` (default:
    its path), the line or row, and the field."""
    p = Path(path).expanduser()
    label = str(p) if label is None else label
    if budget is None:
        budget = ReadBudget(max_rows, max_bytes, max_field_chars)
    if not p.exists():
        raise NotFoundError(f"dataset file not found: {label}")
    if not p.is_file():
        raise InvalidInputError(f"dataset path is not a file: {label}")
    chars = budget.max_field_chars
    problems: list[Problem] = []
    if p.suffix == ".parquet":
        try:
            names = set(pq.read_schema(p).names)
        except (pa.ArrowException, OSError) as exc:
            raise InvalidInputError(f"{label}: not a readable parquet file ({exc})") from None
        normalised = names == set(PROBLEM_SCHEMA.names)  # import_dataset's output
        for i, row in _iter_parquet(p, label, budget):
            where = f"{label} row {i}"
            if normalised:
                problems.append(_normalised_problem(row, where, chars))
            else:
                problems.append(problem_from_record(row, i, where, chars))
    elif p.suffix in (".jsonl", ".json"):
        for lineno, record in _iter_jsonl(p, label, budget):
            problems.append(problem_from_record(record, len(problems), f"{label}:{lineno}", chars))
    else:
        raise InvalidInputError(f"{label}: unsupported dataset format {p.suffix!r}; use .jsonl or .parquet")
    if not problems:
        raise InvalidInputError(f"{label}: the dataset is empty")
    seen: set[str] = set()
    for prob in problems:
        if prob.problem_id in seen:
            raise InvalidInputError(f"{label}: duplicate problem id {prob.problem_id!r} (extra_info.index)")
        seen.add(prob.problem_id)
    return problems


# --- importing (and mixing) datasets into one normalised parquet --------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ImportProgress = Callable[[int, int, str], None]  # (steps done, steps total, what was just done)


def import_dataset(
    paths_with_counts: Sequence[tuple[str | Path, int | None]],
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer=None,
    progress: ImportProgress | None = None,
    *,
    labels: Sequence[str] | None = None,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    max_field_chars: int | None = None,
    file_stem: str | None = None,
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

    Bounds (None: unbounded): max_rows and max_bytes cover everything read from all the files and
    the rows written (DatasetTooLarge), max_field_chars each string of a record (load_problems).
    `labels` name the files in errors instead of their paths; `file_stem` names the written files
    (default: the dataset's name), so concurrent imports under one name need not share a file.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInputError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    inputs = [(Path(p).expanduser(), c) for p, c in paths_with_counts]
    if not inputs:
        raise InvalidInputError("no dataset files given")
    labels = [str(p) for p, _ in inputs] if labels is None else list(labels)
    if len(labels) != len(inputs):
        raise ValueError("one label per input file")
    stem = name if file_stem is None else file_stem
    if not _STEM_RE.match(stem):
        raise InvalidInputError(f"invalid file stem {stem!r}")
    for label, (path, count) in zip(labels, inputs):
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise InvalidInputError(f"{label}: count must be a non-negative integer (0: all), got {count!r}")
    if max_rows is not None and sum(c for _, c in inputs if c) > max_rows:
        raise DatasetTooLarge(f"the counts ask for more than max_dataset_rows={max_rows} rows")
    budget = ReadBudget(max_bytes=max_bytes, max_field_chars=max_field_chars)
    if isinstance(tokenizer, (str, Path)):
        from gradalign_common.modeling import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    steps = len(inputs) + 1
    chosen: list[list[Problem]] = []
    sources = []
    for k, (path, count) in enumerate(inputs):
        budget.rows, budget.max_rows = 0, max_rows  # each file is bounded; the rows selected are bounded below
        problems = load_problems(path, label=labels[k], budget=budget)
        available = len(problems)
        if count and count > len(problems):
            raise InvalidInputError(f"{labels[k]}: asked for {count} problems but the file has {len(problems)}")
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
    if max_rows is not None and len(mixed) > max_rows:
        raise DatasetTooLarge(f"the dataset would have {len(mixed)} rows; at most max_dataset_rows={max_rows}")
    if len(inputs) > 1:
        random.Random(seed).shuffle(mixed)
    out = Path(out_dir).expanduser()
    try:
        path = write_problems(out / f"{stem}.parquet", mixed)
    finally:
        pa.default_memory_pool().release_unused()  # the table written: give its memory back
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
    atomic_write_bytes(out / f"{stem}.json", (json.dumps(metadata, indent=2) + "\n").encode())
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
