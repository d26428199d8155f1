"""The items topic (issue 17): item metadata as a stream of its own, beside the interaction events.

The interaction event schema stays as it is; a product service sends item changes to
`<topic>.items` instead, one JSON object per record, keyed by the item id (so that a compacted
topic keeps each item's latest record):
- put (the default): `{"item_id": "sku-1", "genre": ["shoes"], "price": 59.0, "in_stock": true}`,
  exactly a line of a JSON-lines catalogue file: the item's attributes become these, all others go;
- patch: `{"item_id": "sku-1", "op": "patch", "in_stock": false, "price": null}`: the attributes
  named change, a null removes one, the rest stay. A patch to an item the catalogue lacks adds it
  with the attributes given (a stock update may arrive before the product's full record);
- delete: `{"item_id": "sku-1", "op": "delete"}`, or a tombstone (a null value) keyed by the id.
Values follow the JSON-lines rules of `streamrec.stream.catalogue` (numbers numeric; strings,
booleans and lists of strings categorical; `title` text), and an attribute keeps the kind it has:
a record that would change it is refused. A refused record raises `ItemRecordError` with a reason
code, for the dead-letter topic.

Changes are applied in batches (`apply_changes`): the changed items are taken out of the columnar
catalogue and their new rows appended, array work over the catalogue plus work per changed item,
never a rebuild item by item.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import orjson

from streamrec.stream.catalogue import (
    MAX_ATTRIBUTES,
    TEXT_ATTRIBUTES,
    CatalogueBuilder,
    CatalogueError,
    Categorical,
    ItemCatalogue,
    Value,
    json_attributes,
)

Op = Literal["put", "patch", "delete"]
RESERVED = frozenset({"item_id", "op"})  # a record's keys that are not attributes


class ItemRecordError(ValueError):
    """An items-topic record that cannot be applied; `reason` is a short code for the dead letter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ItemChange:
    item_id: str
    op: Op
    attributes: Mapping[str, Value | None]  # None (patch only): remove the attribute

    def then(self, later: ItemChange) -> ItemChange:
        """This change followed by `later` on the same item, as one change."""
        if later.op != "patch":
            return later
        if self.op == "patch":
            return ItemChange(self.item_id, "patch", {**self.attributes, **later.attributes})
        base = self.attributes if self.op == "put" else {}
        merged = {**base, **later.attributes}
        return ItemChange(self.item_id, "put", {k: v for k, v in merged.items() if v is not None})

    def record(self) -> bytes:
        """The change as an items-topic record value (what `decode_item_record` reads back)."""
        return orjson.dumps({"item_id": self.item_id, **({} if self.op == "put" else {"op": self.op}),
                             **self.attributes})


def kind_of(name: str, value: Value) -> str:
    return "text" if name in TEXT_ATTRIBUTES else "numeric" if isinstance(value, float) else "categorical"


def decode_item_record(key: bytes | None, value: bytes | None, kinds: Mapping[str, str]) -> ItemChange:
    """One record as a change, checked against the attribute `kinds` the catalogue has so far;
    ItemRecordError names what is wrong."""
    if value is None:
        if not key:
            raise ItemRecordError("tombstone_without_key", "a null value deletes the item its key names; this has no key")
        try:
            item_id = key.decode()
        except UnicodeDecodeError:
            raise ItemRecordError("bad_key", "a tombstone's key is not UTF-8") from None
        return check_change(ItemChange(item_id, "delete", {}), kinds)
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ItemRecordError("not_json", str(exc)[:200]) from None
    if not isinstance(record, dict):
        raise ItemRecordError("not_object", f"a JSON object is expected, not a {type(record).__name__}")
    op = record.get("op", "put")
    if op not in get_args(Op):
        raise ItemRecordError("bad_op", f"op must be one of {', '.join(get_args(Op))}, got {str(op)[:80]!r}")
    item_id = record.get("item_id")
    if not isinstance(item_id, str):
        raise ItemRecordError("bad_item_id", "item_id must be a string")
    if key is not None and key != item_id.encode(errors="surrogatepass"):
        raise ItemRecordError("key_mismatch", f"the record is keyed {key[:80]!r} but describes item {item_id[:80]!r}: "
                                              "a compacted topic would keep the wrong record")
    try:
        attributes = json_attributes(record, RESERVED) if op != "delete" else {}
    except CatalogueError as exc:
        raise ItemRecordError("bad_attribute", str(exc)) from None
    if op == "put":
        attributes = {k: v for k, v in attributes.items() if v is not None}
    return check_change(ItemChange(item_id, op, attributes), kinds)


def check_change(change: ItemChange, kinds: Mapping[str, str]) -> ItemChange:
    """Each attribute's kind so far, their count, and the builder's rules (id, names, lengths,
    Unicode)."""
    new = set()
    for name, value in change.attributes.items():
        if value is None:
            continue
        kind, known = kind_of(name, value), kinds.get(name)
        if known is None:
            new.add(name)
        elif known != kind:
            raise ItemRecordError("kind_conflict", f"attribute {name!r} is {known} in the catalogue, {kind} here")
    if len(kinds) + len(new) > MAX_ATTRIBUTES:
        raise ItemRecordError("too_many_attributes", f"the catalogue would have more than {MAX_ATTRIBUTES} attributes")
    builder = CatalogueBuilder("record")
    try:
        builder.add(0, change.item_id, {k: v for k, v in change.attributes.items() if v is not None})
    except CatalogueError as exc:
        raise ItemRecordError("bad_item", str(exc).removeprefix("record:0: ")) from None
    return change


class PendingChanges:
    """The changes read since the catalogue was last published, one per item (later ones folded
    into earlier ones), and the attribute kinds they bring."""

    def __init__(self, kinds: Mapping[str, str]) -> None:
        self.by_item: dict[str, ItemChange] = {}
        self.kinds = dict(kinds)

    def __len__(self) -> int:
        return len(self.by_item)

    def add(self, change: ItemChange) -> None:
        prior = self.by_item.get(change.item_id)
        self.by_item[change.item_id] = change if prior is None else prior.then(change)
        for name, value in change.attributes.items():
            if value is not None:
                self.kinds.setdefault(name, kind_of(name, value))

    def __iter__(self) -> Iterator[ItemChange]:
        return iter(self.by_item.values())


def apply_changes(catalogue: ItemCatalogue, changes: Iterable[ItemChange], kinds: Mapping[str, str] | None = None,
                  ) -> tuple[ItemCatalogue, list[tuple[ItemChange, CatalogueError]]]:
    """(the catalogue with `changes` (one per item) applied, the changes it refused with why).
    Changed items leave their place and their new rows are appended; a patch starts from the
    item's current attributes. A change whose merged row breaks a rule is refused alone (the item
    keeps its row), never the batch. `kinds`: attributes to keep as (possibly empty) columns, so an
    attribute keeps its kind whichever batch the records fell in."""
    changes = list(changes)
    current = catalogue.attributes_of(c.item_id for c in changes if c.op == "patch")
    builder = CatalogueBuilder("items topic")
    applied, refused = [], []
    for line, change in enumerate(changes, 1):
        if change.op == "delete":
            applied.append(change.item_id)
            continue
        merged = {**current.get(change.item_id, {}), **change.attributes} if change.op == "patch" else change.attributes
        row = {k: v for k, v in merged.items() if v is not None}
        try:
            CatalogueBuilder("items topic").add(line, change.item_id, row)  # checked alone first: add is not atomic
        except CatalogueError as exc:
            refused.append((change, exc))
            continue
        builder.add(line, change.item_id, row)
        applied.append(change.item_id)
    added = builder.build().appended(_columns(kinds or {}))
    return catalogue.without(applied).appended(added), refused


def _columns(kinds: Mapping[str, str]) -> ItemCatalogue:
    """No items, one empty column per attribute."""
    empty = np.zeros(0, np.int32)
    return ItemCatalogue(np.empty(0, object),
                         {n: Categorical((), empty, np.zeros(1, np.int64)) for n, k in kinds.items() if k == "categorical"},
                         {n: np.zeros(0) for n, k in kinds.items() if k == "numeric"},
                         {n: np.empty(0, object) for n, k in kinds.items() if k == "text"})


def put_records(catalogue: ItemCatalogue) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of a put record per item: a whole catalogue sent to the items topic."""
    for item_id, attributes in catalogue.attributes_of(catalogue.ids.tolist()).items():
        if "op" in attributes:
            raise CatalogueError(f"item {item_id[:80]!r}: 'op' is reserved in the items topic; rename the attribute")
        yield item_id.encode(), ItemChange(item_id, "put", attributes).record()
