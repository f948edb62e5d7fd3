"""Batches of the batched exact-scoring path: consecutive groups packed into right-padded model inputs.

`plan_batches` packs groups (their responses and per-response loss weights) into batches that fit
(a BatchFits test: the memory plan's, services.scoring.memory_plan, or rows x width at most a token
limit), splitting a group too large for one batch into chunks;
`Batch` holds one batch's model inputs and where each chunk's rows, selected tokens and
embedding rows are, so that hooks can separate each group's share of a layer's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from gradalign_common.records import RolloutRecord

ROWS = "rows"  # a tensor laid out [rows, width, ...] like the batch's input ids
TOKENS = "tokens"  # a tensor laid out [selected tokens, ...] (lm_head's input and output)

DEFAULT_MAX_BATCH_TOKENS = 2048  # the earlier default token limit (rows x width per forward), now an override

BatchFits = Callable[[int, int, bool], bool]
"""fits(rows, width, split): whether a batch of `rows` rows `width` tokens wide fits; `split` when it holds part
of a group too large for one batch."""


def token_limit(max_batch_tokens: int) -> BatchFits:
    """A BatchFits of at most max_batch_tokens rows x width."""
    return lambda rows, width, split=False: rows * width <= max_batch_tokens


@dataclass(frozen=True)
class Chunk:
    """Some or all responses of one group: the part of the group that goes into one batch.

    `key` identifies the group for the caller; `weights` are the per-response loss weights
    A_j / denominator; `first`/`last` say whether this is the group's first/last chunk.
    """

    key: int
    records: tuple[RolloutRecord, ...]
    weights: tuple[float, ...]
    first: bool = True
    last: bool = True

    @property
    def complete(self) -> bool:
        return self.first and self.last


def plan_batches(
    groups: Iterable[tuple[int, Sequence[RolloutRecord], Sequence[float]]], fits: "BatchFits | int",
    target: int | None = None,
) -> Iterator[list[Chunk]]:
    """Consecutive groups (key, records, per-response weights) packed into batches.

    Every batch fits (rows, and width the longest prompt + response in it; an int is a token limit),
    unless one group alone does not: such a group is split by responses into chunks, each its own
    batch that fits as a split batch (or holds a single response). With `target` (rows x width), groups
    are packed together only up to it: a batch larger than the device needs to be busy costs memory and
    buys no speed (services.scoring.memory_plan.BatchPlan.target_tokens); a group larger than the target
    is a batch of its own, never split for it. The groups between splits are cut into as few batches as
    greedy packing makes, balanced: the largest batch (rows x width) is as small as that number of
    batches allows (`_balanced`), so a round's peak memory is that of its typical batch rather than of
    one greedy batch filled to the budget, and no pass is added.
    """
    if isinstance(fits, int):
        fits = token_limit(fits)
    run: list[tuple[int, Sequence[RolloutRecord], Sequence[float], list[int]]] = []
    for key, records, weights in groups:
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in records]
        if not fits(len(records), max(lengths), False):
            yield from _balanced(run, fits, target)
            run = []
            yield from ([c] for c in _split(key, records, weights, lengths, fits))
            continue
        run.append((key, records, weights, lengths))
    yield from _balanced(run, fits, target)


def _greedy(run, fits: BatchFits, cap: int | None = None) -> list[list[Chunk]]:
    """Consecutive groups of `run` (each fitting alone) packed greedily into batches that fit and, with
    `cap`, hold at most cap rows x width."""
    batches: list[list[Chunk]] = []
    batch: list[Chunk] = []
    rows = width = 0
    for key, records, weights, lengths in run:
        new_rows, new_width = rows + len(records), max(width, max(lengths))
        if batch and (not fits(new_rows, new_width, False) or (cap is not None and new_rows * new_width > cap)):
            batches.append(batch)
            batch, new_rows, new_width = [], len(records), max(lengths)
        batch.append(Chunk(key, tuple(records), tuple(weights)))
        rows, width = new_rows, new_width
    if batch:
        batches.append(batch)
    return batches


def _size(batch: list[Chunk]) -> int:
    records = [r for c in batch for r in c.records]
    return len(records) * max(len(r.prompt_ids) + len(r.response_ids) for r in records)


def _balanced(run, fits: BatchFits, target: int | None = None) -> list[list[Chunk]]:
    """Greedy packing's number of batches (up to `target` rows x width when given), with the smallest cap on
    a batch's rows x width that keeps it: a binary search over the cap (the number of batches never grows
    with the cap; at greedy's own largest batch it is greedy's)."""
    batches = _greedy(run, fits, target)
    if len(batches) < 2:
        return batches
    low = max(len(records) * max(lengths) for _, records, _, lengths in run) - 1  # infeasible: some group exceeds it
    high = max(_size(b) for b in batches)  # feasible
    while high - low > 1:
        middle = (low + high) // 2
        if len(_greedy(run, fits, _within(middle, target))) <= len(batches):
            high = middle
        else:
            low = middle
    return _greedy(run, fits, _within(high, target))


def _within(cap: int, target: int | None) -> int:
    return cap if target is None else min(cap, target)


def _split(key, records, weights, lengths, fits: BatchFits) -> list[Chunk]:
    order = sorted(range(len(records)), key=lambda j: lengths[j])  # similar lengths together: less padding
    parts: list[list[int]] = [[]]
    for j in order:
        part = parts[-1]
        if part and not fits(len(part) + 1, max(lengths[k] for k in part + [j]), True):
            parts.append([j])
        else:
            part.append(j)
    return [
        Chunk(key, tuple(records[j] for j in part), tuple(weights[j] for j in part), i == 0, i == len(parts) - 1)
        for i, part in enumerate(parts)
    ]


class Batch:
    """The model inputs of some chunks, right-padded, and where each chunk's rows and tokens are.

    The loss is -sum over selected tokens of weight * log p(target); a token is selected when
    it is a response token of a response with a non-zero weight. Slot s (chunk s) owns rows
    row_ranges[s] of every [rows, width, ...] tensor and tokens token_ranges[s] of every
    [selected tokens, ...] tensor; `padded` lays either out as [slots, tokens, features].
    `padding_idx` and `vocab_size` are the input embedding's.
    """

    def __init__(self, chunks: Sequence[Chunk], device: torch.device, padding_idx: int | None = None,
                 vocab_size: int | None = None):
        self.chunks = list(chunks)
        rows = [(r, w) for c in self.chunks for r, w in zip(c.records, c.weights)]
        width = max(len(r.prompt_ids) + len(r.response_ids) for r, _ in rows)
        n_rows = len(rows)
        input_ids = torch.zeros((n_rows, width), dtype=torch.long)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
        weights = torch.zeros((n_rows, width - 1), dtype=torch.float64)
        for b, (record, weight) in enumerate(rows):
            ids = list(record.prompt_ids) + list(record.response_ids)
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            # Row b's logits at column c predict input_ids[b, c + 1].
            weights[b, len(record.prompt_ids) - 1 : len(ids) - 1] = weight
        selected = weights != 0.0
        self.n_rows, self.width = n_rows, width
        self.row_ranges, self.token_ranges = [], []
        row = token = 0
        tokens_per_row = selected.sum(1).tolist()
        for c in self.chunks:
            n = len(c.records)
            n_tokens = int(sum(tokens_per_row[row : row + n]))
            self.row_ranges.append((row, row + n))
            self.token_ranges.append((token, token + n_tokens))
            row, token = row + n, token + n_tokens
        self.n_tokens = token
        n_slots = len(self.chunks)
        rows_per_slot = [len(c.records) for c in self.chunks]
        tokens_per_slot = [t1 - t0 for t0, t1 in self.token_ranges]
        self.uniform_rows = len(set(rows_per_slot)) == 1
        self.uniform_tokens = len(set(tokens_per_slot)) == 1
        self.max_rows, self.max_tokens = max(rows_per_slot), max(tokens_per_slot)
        row_slot = torch.repeat_interleave(torch.arange(n_slots), torch.tensor(rows_per_slot))
        token_slot = torch.repeat_interleave(torch.arange(n_slots), torch.tensor(tokens_per_slot))
        row_position = torch.cat([torch.arange(n) for n in rows_per_slot])
        token_position = torch.cat([torch.arange(n) for n in tokens_per_slot])
        # The embedding's rows for each group: its real tokens' flat positions (into rows * width), in
        # slot order; the unique (slot, token id) pairs, sorted, so that each slot's are contiguous;
        # and each position's index into those.
        flat_ids = input_ids.reshape(-1)
        real = attention_mask.reshape(-1).bool()
        if padding_idx is not None:
            real &= flat_ids != padding_idx  # nn.Embedding gives its padding row no gradient
        positions = torch.nonzero(real).squeeze(1)  # row-major: slot order
        radix = vocab_size or int(flat_ids.max()) + 1
        self.radix = radix
        keys = row_slot[positions // width] * radix + flat_ids[positions]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        unique_slot = unique_keys // radix
        token_counts = torch.bincount(row_slot[positions // width], minlength=n_slots).tolist()
        unique_counts = torch.bincount(unique_slot, minlength=n_slots).tolist()
        self._token_bounds = _bounds(token_counts)
        self._unique_bounds = _bounds(unique_counts)
        to = dict(device=device)
        self.input_ids = input_ids.to(**to)
        self.attention_mask = attention_mask.to(**to)
        self.position_ids = torch.arange(width).expand(n_rows, width).to(**to)
        self.selected = selected.to(**to)
        self.targets = self.input_ids[:, 1:][self.selected]
        self.token_weights = weights[selected].to(**to)
        self.embedding_positions = positions.to(**to)
        self.embedding_inverse = inverse.to(**to)
        self.embedding_ids = (unique_keys % radix).to(**to)
        self.embedding_slot = unique_slot.to(**to)
        self.embedding_keys = unique_keys.to(**to)  # slot * radix + token id, sorted
        self._row_slot, self._token_slot = row_slot, token_slot
        self._row_index = (row_slot.to(**to), row_position.to(**to))
        self._token_index = (token_slot.to(**to), token_position.to(**to))
        self._onehots: dict[tuple, torch.Tensor] = {}
        self.device = device

    @property
    def n_slots(self) -> int:
        return len(self.chunks)

    def embedding_rows(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot s's (flat positions of its real tokens, their unique token ids, each position's index into those)."""
        t0, t1 = self._token_bounds[s]
        u0, u1 = self._unique_bounds[s]
        return self.embedding_positions[t0:t1], self.embedding_ids[u0:u1], self.embedding_inverse[t0:t1] - u0

    def padded(self, t: torch.Tensor, layout: str) -> torch.Tensor:
        """t as [slots, tokens, features]: slot s's rows (or selected tokens), zero-padded to the longest
        slot's (a view when every slot has as many)."""
        d = t.shape[-1]
        if layout == ROWS:
            rows = t.reshape(self.n_rows, -1, d)
            if self.uniform_rows:
                return rows.reshape(self.n_slots, -1, d)
            out = rows.new_zeros((self.n_slots, self.max_rows, rows.shape[1], d))
            out[self._row_index] = rows
            return out.reshape(self.n_slots, -1, d)
        if self.uniform_tokens:
            return t.reshape(self.n_slots, -1, d)
        out = t.new_zeros((self.n_slots, self.max_tokens, d))
        out[self._token_index] = t
        return out

    def padding_ratio(self, layout: str) -> float:
        """Size of `padded`'s result over the size of its input."""
        if layout == ROWS:
            return self.n_slots * self.max_rows / self.n_rows
        return self.n_slots * self.max_tokens / max(1, self.n_tokens)

    def unique_range(self, first: int, stop: int) -> tuple[int, int]:
        """The unique embedding rows of slots first .. stop - 1 (contiguous)."""
        return self._unique_bounds[first][0], self._unique_bounds[stop - 1][1]

    def onehot(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """[slots, n] indicator of which slot each row (kind rows), selected token (tokens) or unique
        embedding row (embedding) belongs to; sums per slot are one matmul with it."""
        key = (kind, dtype)
        if key not in self._onehots:
            index = {ROWS: self._row_slot, TOKENS: self._token_slot, "embedding": self.embedding_slot.cpu()}[kind]
            onehot = torch.zeros((self.n_slots, index.numel()), dtype=dtype)
            onehot[index, torch.arange(index.numel())] = 1.0
            self._onehots[key] = onehot.to(self.device)
        return self._onehots[key]

    def slot_sums(self, t: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
        """[slots, features]: the sum of t over each slot's tokens, in dtype."""
        d = t.shape[-1]
        if layout == ROWS:
            t = t.to(dtype).reshape(self.n_rows, -1, d).sum(1)
        return self.onehot(layout, dtype) @ t.to(dtype)


def _bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out

