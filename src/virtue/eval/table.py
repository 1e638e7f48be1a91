"""A loaded evaluation task: its unique inputs held once, and per query only indices into them.

MMEB tasks give every query its own 1,000 candidates, drawn from a few thousand distinct ones; SCaR repeats
captions. Holding one `EmbedInput` (and one embedding) per (query, candidate) pair would make memory grow with
the pairs (1M per MMEB task), so inputs are interned when rows are read: equal content (text, image, prompt)
under the same candidate name becomes one table entry, and a query keeps an int32 array of entry indices.

Candidate *names* are the official scorer's candidate keys (virtue-spec §5.4; `eval.runner` explains the rule
that uses them): two entries with the same content but different names stay apart, so that every entry has one
name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from virtue.errors import DataError
from virtue.inputs import EmbedInput, as_stored


def content_key(item: EmbedInput) -> tuple:
    """What makes two inputs embed identically, cheaply: the text, the image (path, or object identity for
    in-memory images such as crops, which the table keeps alive) and the prompt (polygons rather than drawn
    masks, so that a mask is not drawn just to intern it)."""
    image = item.image
    if image is None:
        image_key: Any = None
    elif isinstance(image, (str, Path)):
        image_key = ("path", str(image))
    else:
        image_key = ("object", id(image))
    prompt = item.prompt
    if prompt is None:
        return (item.text, image_key, None)
    mask = prompt.mask
    if mask is None:
        mask_key: Any = None
    elif hasattr(mask, "polygons"):  # `rows.PolygonMask`: its polygons decide the drawing
        mask_key = ("polygons", mask.polygons, mask.__dict__.get("size_wh"))  # never reads an image header
    else:
        mask_key = ("array", id(mask))
    return (item.text, image_key, (prompt.points, prompt.box, mask_key))


class InputTable:
    """The unique inputs of one task and, for each, the id of its candidate name (-1 for query-only entries)."""

    def __init__(self) -> None:
        self.inputs: list[EmbedInput] = []
        self._name_ids: list[int] = []
        self._index: dict[tuple, int] = {}
        self._names: dict[str, int] = {}
        self._raw: dict[Hashable, int] = {}
        self._sealed = False

    def add(self, item: EmbedInput, name: str | None = None) -> int:
        """The entry of `item` under candidate `name` (None: a query), added when new."""
        if self._sealed:
            raise RuntimeError("InputTable.add after seal(): the table of a loaded task is read-only")
        key = (content_key(item), name)
        entry = self._index.get(key)
        if entry is None:
            entry = len(self.inputs)
            self._index[key] = entry
            self.inputs.append(as_stored(item))  # dataset boxes are in stored pixels: no EXIF rotation
            self._name_ids.append(-1 if name is None else self._names.setdefault(name, len(self._names)))
        return entry

    def intern(self, raw: Hashable, build: Callable[[], tuple[EmbedInput, str | None]]) -> int:
        """The entry for a raw row value (e.g. a caption, or an MMEB candidate's text, path and instruction):
        `build` makes the input and its name the first time only, so a value repeated a million times is checked
        and keyed once. `raw` must determine what `build` returns."""
        entry = self._raw.get(raw)
        if entry is None:
            entry = self._raw[raw] = self.add(*build())
        return entry

    def seal(self) -> None:
        """Drop the lookup dictionaries once every row is read (they are only needed while loading)."""
        self._index, self._names, self._raw = {}, {}, {}
        self._sealed = True

    @property
    def name_ids(self) -> np.ndarray:
        """int32 [U]: the name id of every entry."""
        return np.asarray(self._name_ids, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True, eq=False)
class EvalQuery:
    """One ranking problem: a query and its own candidates (the official `eval_type: local`, virtue-spec §8.1),
    as indices into its task's `InputTable`.

    Attributes:
        task: the task name given to the loader (e.g. "RefCOCOg", "ImageNet-1K").
        row_id: `"<file>:<row index>"` of the source row.
        table: the task's unique inputs.
        query_id: the query's entry in `table`.
        candidate_ids: int32 [C], the candidates' entries, in the row's order.
        positive: index of the ground truth in the candidate list (0 in both benchmarks' files).
        candidate_kinds: per candidate, SCaR's `neg_types` ("gt", "global_context", ...) when the file has them.
    """

    task: str
    row_id: str
    table: InputTable
    query_id: int
    candidate_ids: np.ndarray
    positive: int = 0
    candidate_kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.candidate_ids)
        if not n:
            raise DataError(f"{self.task} row {self.row_id}: no candidates")
        if not 0 <= self.positive < n:
            raise DataError(f"{self.task} row {self.row_id}: positive {self.positive} not in [0, {n})")
        if self.candidate_kinds is not None and len(self.candidate_kinds) != n:
            raise DataError(
                f"{self.task} row {self.row_id}: {len(self.candidate_kinds)} candidate kinds for {n} candidates"
            )

    @classmethod
    def from_inputs(
        cls,
        task: str,
        row_id: str,
        query: EmbedInput,
        candidates: Sequence[EmbedInput],
        positive: int = 0,
        candidate_kinds: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        table: InputTable | None = None,
    ) -> EvalQuery:
        """A query from its inputs (tests, custom tasks). names: the candidates' names; None gives every candidate
        a name of its own (no name-equal duplicates)."""
        table = table if table is not None else InputTable()
        names = names if names is not None else [f"{row_id}#{i}" for i in range(len(candidates))]
        if len(names) != len(candidates):
            raise DataError(f"{task} row {row_id}: {len(names)} names for {len(candidates)} candidates")
        ids = np.fromiter((table.add(c, n) for c, n in zip(candidates, names, strict=True)), np.int32)
        kinds = tuple(candidate_kinds) if candidate_kinds is not None else None
        return cls(task, row_id, table, table.add(query), ids, positive, kinds)

    @property
    def query(self) -> EmbedInput:
        return self.table.inputs[self.query_id]

    @property
    def candidates(self) -> list[EmbedInput]:
        return [self.table.inputs[i] for i in self.candidate_ids]


@dataclass(eq=False)
class EvalTask(Sequence[EvalQuery]):
    """A loaded task: its table of unique inputs and its queries (a sequence of `EvalQuery`).

    Attributes:
        name: the task name.
        table: the unique inputs, shared by every query.
        queries: one per source row, in file order.
        boxes_outside_image: row ids of SCaR rows whose box crosses the image border (scored as given).
    """

    name: str
    table: InputTable
    queries: list[EvalQuery]
    boxes_outside_image: list[str]

    @overload
    def __getitem__(self, index: int) -> EvalQuery: ...
    @overload
    def __getitem__(self, index: slice) -> list[EvalQuery]: ...
    def __getitem__(self, index):
        return self.queries[index]

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[EvalQuery]:
        return iter(self.queries)

    @classmethod
    def from_queries(cls, name: str, queries: Sequence[EvalQuery]) -> EvalTask:
        """A task from queries that share one table (e.g. built with `EvalQuery.from_inputs(table=...)`)."""
        tables = {id(q.table): q.table for q in queries}
        if len(tables) != 1:
            raise DataError(f"task {name}: the queries must share one InputTable, found {len(tables)}")
        return cls(name, next(iter(tables.values())), list(queries), [])
