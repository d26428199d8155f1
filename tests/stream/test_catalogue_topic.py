"""Items-topic records (streamrec.stream.catalogue_topic): what each record means, what is refused
and why, and that batches of changes applied column-wise give the catalogue a plain model of
"item -> attributes" gives, whatever the changes (hypothesis)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamrec.stream.catalogue import CatalogueError, ItemCatalogue, read_jsonl
from streamrec.stream.catalogue_topic import (
    ItemChange,
    ItemRecordError,
    PendingChanges,
    apply_changes,
    decode_item_record,
    put_records,
)

BASE = read_jsonl([json.dumps(r) for r in (
    {"item_id": "a", "genre": ["x", "y"], "price": 3, "title": "First one"},
    {"item_id": "b", "genre": "z", "in_stock": True},
    {"item_id": "c:1", "price": 9.5},
)], "base")


def rows(catalogue: ItemCatalogue) -> dict[str, dict[str, object]]:
    """The catalogue as {id: {attribute: value}} with categorical values as sorted lists."""
    out = catalogue.attributes_of(catalogue.ids.tolist())
    return {item: {k: sorted(v) if isinstance(v, list) else v for k, v in attrs.items()} for item, attrs in out.items()}


def applied(catalogue: ItemCatalogue, *records: tuple[bytes | None, bytes | None]) -> ItemCatalogue:
    pending = PendingChanges(catalogue.attributes)
    for key, value in records:
        pending.add(decode_item_record(key, value, pending.kinds))
    after, refused = apply_changes(catalogue, pending, pending.kinds)
    assert not refused
    return after


def record(**fields: object) -> tuple[bytes, bytes]:
    return str(fields["item_id"]).encode(), json.dumps(fields).encode()


def put(item: str, **attributes: object) -> tuple[bytes, bytes]:
    return record(item_id=item, **attributes)


def patch(item: str, **attributes: object) -> tuple[bytes, bytes]:
    return record(item_id=item, op="patch", **attributes)


def test_put_replaces_patch_merges_and_removes_delete_and_tombstone_drop() -> None:
    after = applied(BASE,
                    record(item_id="a", genre="w"),  # put: price and title go
                    record(item_id="b", op="patch", in_stock=False, price=1),  # patch: genre stays
                    record(item_id="c:1", op="patch", price=None),  # null removes
                    (b"c:1", None), (b"c:1", None),  # tombstone, twice: still gone once
                    record(item_id="new", op="patch", in_stock=True),  # a patch adds an unknown item
                    record(item_id="gone", op="delete"))  # deleting what is absent changes nothing
    assert rows(after) == {"a": {"genre": ["w"]}, "b": {"genre": ["z"], "in_stock": ["false"], "price": 1.0},
                           "new": {"in_stock": ["true"]}}
    assert after.categorical["genre"].values == ("w", "z")  # values no item holds are gone
    assert after.numeric["price"].tolist()[list(after.ids).index("b")] == 1.0


def test_later_changes_to_one_item_fold_into_one() -> None:
    after = applied(BASE, record(item_id="a", op="delete"), record(item_id="a", op="patch", price=2),
                    record(item_id="b", genre="q"), record(item_id="b", op="patch", price=4, genre=None))
    assert rows(after)["a"] == {"price": 2.0}  # a patch after a delete starts from nothing
    assert rows(after)["b"] == {"price": 4.0}


@pytest.mark.parametrize(("key", "value", "reason"), [
    (b"a", b"{not json", "not_json"),
    (b"a", b"[1, 2]", "not_object"),
    (b"a", b'{"op": "put"}', "bad_item_id"),
    (b"other", b'{"item_id": "a"}', "key_mismatch"),
    (b"a", b'{"item_id": "a", "op": "upsert"}', "bad_op"),
    (b"a", b'{"item_id": "a", "price": "cheap"}', "kind_conflict"),
    (b"a", b'{"item_id": "a", "op": "patch", "genre": 5}', "kind_conflict"),
    (b"a", b'{"item_id": "a", "genre": {"nested": 1}}', "bad_attribute"),
    (b"a", b'{"item_id": "a", "bad name": "x"}', "bad_item"),
    (b"a", json.dumps({"item_id": "a", "title": ["x" * 200, "y" * 200]}).encode(), "bad_item"),  # joined: 401
    (b"a", json.dumps({"item_id": "a", "genre": [f"g{n}" for n in range(257)]}).encode(), "bad_item"),
    (b"a", json.dumps({"item_id": "a", **{f"a{n}": 1 for n in range(70)}}).encode(), "too_many_attributes"),
    (b"a", json.dumps({"item_id": "a", "genre": "v" * 10_000}).encode(), "bad_item"),
    (None, json.dumps({"item_id": "j" * 10_000}).encode(), "bad_item"),
    (b"a", b'{"item_id": "a", "genre": "\\ud800"}', "not_json"),  # orjson refuses a lone surrogate
    (None, None, "tombstone_without_key"),
    (b"\xff\xfe", None, "bad_key"),
])
def test_records_that_cannot_apply_are_refused_with_a_reason(key: bytes | None, value: bytes | None,
                                                             reason: str) -> None:
    with pytest.raises(ItemRecordError) as refused:
        decode_item_record(key, value, BASE.attributes)
    assert refused.value.reason == reason


def test_the_attribute_count_is_bounded_across_records() -> None:
    pending = PendingChanges(BASE.attributes)
    for n in range(64 - len(BASE.attributes)):
        pending.add(decode_item_record(None, json.dumps({"item_id": f"i{n}", f"attr{n}": 1}).encode(), pending.kinds))
    with pytest.raises(ItemRecordError) as refused:
        decode_item_record(None, b'{"item_id": "x", "one_more": 1}', pending.kinds)
    assert refused.value.reason == "too_many_attributes"


def test_a_file_sent_as_records_reads_back_as_the_file() -> None:
    sent = [decode_item_record(key, value, {}) for key, value in put_records(BASE)]
    assert rows(apply_changes(ItemCatalogue.empty(), sent)[0]) == rows(BASE)
    clashing = read_jsonl(['{"item_id": "a", "op": "x"}'], "f")
    with pytest.raises(CatalogueError, match="reserved"):
        list(put_records(clashing))


ids = st.sampled_from([f"i{n}" for n in range(12)])
values = st.one_of(st.none(), st.sampled_from(["red", "blue", "a:b"]), st.lists(st.sampled_from(["x", "y", "z"]),
                                                                              max_size=3))
numbers = st.one_of(st.none(), st.integers(-5, 5))
changes = st.lists(st.tuples(ids, st.sampled_from(["put", "patch", "delete", "tombstone"]), values, numbers),
                   max_size=40)


@settings(max_examples=150, deadline=None)
@given(first=changes, second=changes)
def test_batches_of_changes_give_what_a_plain_model_gives(first: list, second: list) -> None:
    model: dict[str, dict[str, object]] = {}
    catalogue = ItemCatalogue.empty()
    for batch in (first, second):
        pending = PendingChanges(catalogue.attributes)
        for item, op, colour, size in batch:
            if op == "tombstone":
                pending.add(decode_item_record(item.encode(), None, pending.kinds))
                model.pop(item, None)
                continue
            fields = {"colour": colour, "size": size}
            pending.add(decode_item_record(None, json.dumps({"item_id": item, "op": op, **fields}).encode(),
                                           pending.kinds))
            given_ = {k: (sorted(set([v] if isinstance(v, str) else v)) if k == "colour" else float(v))
                      for k, v in fields.items() if v is not None and v != []}
            if op == "delete":
                model.pop(item, None)
            elif op == "put":
                model[item] = given_
            else:
                merged = {**model.get(item, {}), **given_}
                model[item] = {k: v for k, v in merged.items() if fields[k] is not None and fields[k] != []}
        catalogue, refused = apply_changes(catalogue, pending, pending.kinds)
        assert not refused
        assert rows(catalogue) == model
        assert sorted(catalogue.ids.tolist()) == sorted(model)
        for value in ("red", "x", "a:b"):  # the filter index agrees with the rows
            column = catalogue.categorical.get("colour")
            held = set() if column is None else {catalogue.ids[p] for p in column.holding(value).tolist()}
            assert held == {i for i, attrs in model.items() if value in attrs.get("colour", [])}
        if "size" in catalogue.numeric:
            sizes = catalogue.numeric["size"]
            assert all((np.isnan(sizes[p]) if "size" not in model[i] else sizes[p] == model[i]["size"])
                       for p, i in enumerate(catalogue.ids.tolist()))


def test_ids_that_differ_only_in_trailing_nul_characters_stay_apart() -> None:
    after = applied(ItemCatalogue.empty(), put("nul\u0000", g="x"), put("nul", g="y"))
    after = applied(after, patch("nul", h="z"))
    assert rows(after) == {"nul\u0000": {"g": ["x"]}, "nul": {"g": ["y"], "h": ["z"]}}


def test_a_change_that_breaks_a_rule_is_refused_alone_and_the_rest_apply() -> None:
    bad = ItemChange("a", "patch", {"bad name": "x"})  # as if it had passed the record's checks
    after, refused = apply_changes(BASE, [bad, ItemChange("b", "delete", {}), ItemChange("n", "put", {"genre": ["q"]})])
    assert [(change.item_id, "attribute name" in str(exc)) for change, exc in refused] == [("a", True)]
    assert rows(after) == {"a": rows(BASE)["a"], "c:1": rows(BASE)["c:1"], "n": {"genre": ["q"]}}


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["put", "patch", "delete"]),
                                  st.sampled_from(["s", 1.5, None])), max_size=12),
       cut=st.integers(0, 12))
@example(records=[("a", "put", "s"), ("a", "put", None), ("b", "put", 1.5)], cut=2)  # the hunt's case
def test_what_is_refused_and_kept_does_not_depend_on_how_records_fall_into_batches(records: list, cut: int) -> None:
    """A re-read after a crash or a restore cuts the same records into other batches."""
    def run(batches: list[list]) -> tuple[dict, list]:
        catalogue, refusals = ItemCatalogue.empty(), []
        kinds: dict[str, str] = {}
        for batch in batches:
            pending = PendingChanges({**catalogue.attributes, **kinds})
            for n, (item, op, x) in enumerate(batch):
                try:
                    pending.add(decode_item_record(None, json.dumps({"item_id": item, "op": op, "x": x}).encode(),
                                                   pending.kinds))
                except ItemRecordError as exc:
                    refusals.append((n, exc.reason))
            catalogue, refused = apply_changes(catalogue, pending, pending.kinds)
            assert not refused
        return rows(catalogue), [reason for _, reason in refusals]

    assert run([records]) == run([records[:cut], records[cut:]])
