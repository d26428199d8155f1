"""The item catalogue's readers and blob form: every layout, every rule, and hostile input
(ids and values of 10 kB, `:` in names, a blob whose offsets lie about lengths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server.artifacts import decode_catalogue, encode_catalogue
from streamrec.stream.catalogue import CatalogueError, ItemCatalogue, read_catalogue

U_ITEM = """1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0
2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0
267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="latin-1" if name == "u.item" else "utf-8")
    return path


def items_with(catalogue: ItemCatalogue, attribute: str, value: str) -> list[str]:
    return sorted(catalogue.ids[catalogue.categorical[attribute].holding(value)].tolist())


def test_movielens_u_item_gives_genres_years_and_titles(tmp_path):
    catalogue = read_catalogue(write(tmp_path, "u.item", U_ITEM))
    assert catalogue.ids.tolist() == ["1", "2", "267"]
    assert items_with(catalogue, "genre", "Comedy") == ["1"]
    assert items_with(catalogue, "genre", "Action") == ["2"]
    assert items_with(catalogue, "genre", "unknown") == ["267"]
    assert catalogue.numeric["year"][:2].tolist() == [1995.0, 1995.0] and np.isnan(catalogue.numeric["year"][2])
    assert catalogue.text["title"].tolist() == ["Toy Story (1995)", "GoldenEye (1995)", "unknown"]


def test_a_u_item_title_holding_a_pipe_keeps_its_title_date_and_genres(tmp_path):
    """u.item has no quoting: a title with `|` spans two fields. It used to be cut at the `|`, and
    the rest of the title was read as the release date, so the item lost its year."""
    flags = "|".join("1" if g in (1, 5) else "0" for g in range(19))
    catalogue = read_catalogue(write(tmp_path, "u.item", f"7|Tom | Jerry (1992)|01-Jan-1992||http://x|{flags}\n"))
    assert catalogue.text["title"].tolist() == ["Tom | Jerry (1992)"]
    assert catalogue.numeric["year"].tolist() == [1992.0]
    assert items_with(catalogue, "genre", "Action") == ["7"] and items_with(catalogue, "genre", "Comedy") == ["7"]


def test_an_empty_string_is_no_value_in_every_format(tmp_path):
    """A stored "" could not be named by any filter clause (`exclude=color:` is refused), so an
    item holding it could never be excluded: "" is now no value, as an empty CSV cell always was."""
    lines = [{"item_id": "a", "color": "", "tags": ["", "x"], "title": ""}, {"item_id": "b", "color": "red"}]
    catalogue = read_catalogue(write(tmp_path, "items.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"))
    assert catalogue.categorical["color"].values == ("red",)
    assert catalogue.categorical["tags"].values == ("x",)
    assert items_with(catalogue, "tags", "x") == ["a"]
    csv_catalogue = read_catalogue(write(tmp_path, "items.csv", "item_id,color\na,\nb,red\n"))
    assert csv_catalogue.categorical["color"].values == ("red",)


def test_csv_columns_are_typed_by_their_values(tmp_path):
    path = write(tmp_path, "items.csv", "item_id,title,genres,price,in_stock\n"
                                        "a,Alpha,x|y,9.5,true\nb,Beta,y,,false\nc,Gamma,,12,true\n")
    catalogue = read_catalogue(path)
    assert catalogue.attributes == {"genres": "categorical", "in_stock": "categorical", "price": "numeric",
                                    "title": "text"}
    assert items_with(catalogue, "genres", "y") == ["a", "b"]
    assert items_with(catalogue, "in_stock", "false") == ["b"]
    price = catalogue.numeric["price"]
    assert price[0] == 9.5 and np.isnan(price[1]) and price[2] == 12.0


def test_jsonl_values_are_typed_by_json(tmp_path):
    lines = [{"item_id": "sku:1", "tags": ["a:b", "c"], "price": 3, "available": True, "title": "One"},
             {"item_id": "sku:2", "tags": "c", "available": False, "note": None}]
    catalogue = read_catalogue(write(tmp_path, "items.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"))
    assert items_with(catalogue, "tags", "a:b") == ["sku:1"]  # ':' in ids and values is fine
    assert items_with(catalogue, "tags", "c") == ["sku:1", "sku:2"]
    assert items_with(catalogue, "available", "false") == ["sku:2"]
    assert catalogue.numeric["price"][0] == 3.0 and np.isnan(catalogue.numeric["price"][1])


@pytest.mark.parametrize(("name", "text", "message"), [
    ("items.jsonl", '{"item_id": "a"}\n{"item_id": "a"}\n', "items.jsonl:2: item 'a' appears twice (first on line 1)"),
    ("items.jsonl", '{"item_id": "' + "x" * 10_000 + '"}\n', "items.jsonl:1: item_id must be a string of 1 to 256"),
    ("items.jsonl", '{"item_id": 7}\n', "items.jsonl:1: item_id must be a string"),
    ("items.jsonl", '{"item_id": "a", "genre:x": "y"}\n', "items.jsonl:1: attribute name 'genre:x'"),
    ("items.jsonl", '{"item_id": "a", "g": "' + "v" * 10_000 + '"}\n', "longer than 256 characters"),
    ("items.jsonl", '{"item_id": "a", "g": {"k": 1}}\n', "items.jsonl:1: attribute 'g': a dict is not"),
    ("items.jsonl", '{"item_id": "a", "g": "x"}\n{"item_id": "b", "g": 2}\n', "items.jsonl:2: attribute 'g' is categorical"),
    ("items.jsonl", "[1, 2]\n", "items.jsonl:1: a JSON object is expected"),
    ("items.jsonl", "{oops\n", "items.jsonl:1: not JSON"),
    ("items.csv", "id,title\n1,x\n", "items.csv:1: a header with an item_id column"),
    ("items.csv", "item_id,g\na,x\nb,y,z\n", "items.csv:3: 3 fields, the header has 2"),
    ("items.csv", "item_id,g,g\na,x,y\n", "items.csv:1: column 'g' appears more than once"),
    ("u.item", "1|Toy Story|01-Jan-1995\n", "u.item:1: not a u.item line"),
    ("items.txt", "", "cannot tell the format"),
    # what the parsers raise themselves comes out as CatalogueError too (it left tracebacks before)
    ("items.jsonl", '{"item_id": "a", "n": 1' + "0" * 400 + '}\n', "items.jsonl:1: attribute 'n': int too large"),
    ("items.jsonl", '{"item_id": "a", "p": 1}\n{"item_id": "b", "p": NaN}\n', "items.jsonl:2: attribute 'p': nan is not a"),
    ("items.jsonl", '{"item_id": "a", "p": -Infinity}\n', "items.jsonl:1: attribute 'p': -inf is not a finite number"),
    ("items.jsonl", '{"item_id": "a", "g": "\\ud800x"}\n', "items.jsonl:1: '\\ud800x' is not valid Unicode text"),
    ("items.jsonl", '{"item_id": "a", "g": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "RecursionError"),
    ("items.csv", "item_id,g\na," + "x" * 200_000 + "\n", "field larger than field limit"),
    # an infinite cell in a column of numbers is refused, as in JSON lines (it made the column categorical)
    ("items.csv", "item_id,price\na,1.5\nb,inf\n", "items.csv:3: column 'price': 'inf' is not a finite number"),
    ("items.csv", "item_id,price\na,-Infinity\nb,2\n", "items.csv:2: column 'price': '-Infinity' is not a finite"),
    ("items.csv", "item_id,price\na,1\nb,n/a\nc,1e999\n", "items.csv:4: column 'price': '1e999' is not a finite"),
])
def test_a_broken_rule_is_refused_with_its_line(tmp_path, name, text, message):
    with pytest.raises(CatalogueError, match=None) as refused:
        read_catalogue(write(tmp_path, name, text))
    assert message in str(refused.value)


def test_too_many_attributes_are_refused(tmp_path):
    record = {"item_id": "a", **{f"a{n}": "x" for n in range(65)}}
    with pytest.raises(CatalogueError, match="more than 64 attributes"):
        read_catalogue(write(tmp_path, "items.jsonl", json.dumps(record) + "\n"))


def test_the_blob_round_trips_and_a_lying_blob_is_refused(tmp_path):
    catalogue = read_catalogue(write(tmp_path, "u.item", U_ITEM))
    back = decode_catalogue(encode_catalogue(catalogue))
    assert back.ids.tolist() == catalogue.ids.tolist()
    assert back.attributes == catalogue.attributes
    assert items_with(back, "genre", "Comedy") == ["1"]
    np.testing.assert_array_equal(back.numeric["year"], catalogue.numeric["year"])
    header, arrays = catalogue.to_arrays()
    lying = dict(arrays, ids_offsets=arrays["ids_offsets"] + 5)  # offsets past the end of the bytes
    with pytest.raises(CatalogueError, match="offsets"):
        ItemCatalogue.from_arrays(header, lying)
    outside = dict(arrays, c0_items=arrays["c0_items"] + 100)  # positions of items that do not exist
    with pytest.raises(CatalogueError, match="inconsistent"):
        ItemCatalogue.from_arrays(header, outside)
    with pytest.raises(CatalogueError, match="not a catalogue"):
        ItemCatalogue.from_arrays({"kind": "ranker"}, arrays)


def test_a_missing_number_keeps_its_column_numeric(tmp_path):
    """One `n/a` in a stock column made it categorical, which silently turned off the configured
    rule `range=stock:1..`: out-of-stock items were served. It is now no value, so the item fails
    every range on the column."""
    path = write(tmp_path, "items.csv", "item_id,stock,note,code\na,0,n/a,1_000\nb,n/a,x,2\nc,NaN,y,3\nd,-,z,4\n"
                                        "e,3,,5\n")
    catalogue = read_catalogue(path)
    assert catalogue.attributes == {"stock": "numeric", "note": "categorical", "code": "categorical"}
    stock = catalogue.numeric["stock"]
    assert stock[0] == 0 and stock[4] == 3 and np.isnan(stock[1:4]).all()
    assert items_with(catalogue, "note", "n/a") == ["a"]  # in a column of words it is a word


def test_a_column_of_infinities_alone_or_among_words_stays_categorical(tmp_path):
    """Only a column of numbers with a finite one is numeric (and refuses an infinite cell): `inf`
    among words, or alone, is a word."""
    catalogue = read_catalogue(write(tmp_path, "items.csv", "item_id,size,mood\na,inf,x\nb,-inf,Infinity\n"))
    assert catalogue.attributes == {"size": "categorical", "mood": "categorical"}
    assert items_with(catalogue, "size", "-inf") == ["b"] and items_with(catalogue, "mood", "Infinity") == ["b"]


@pytest.mark.parametrize("blob", [b"SRDENSE1", b"SRDENSE1garbage", b"SRDENSE1\x04\x00\x00\x00[1]]",
                                  b"SRDENSE1\x02\x00\x00\x00{}PK\x03\x04trunc", b"not a blob at all"])
def test_a_blob_that_is_not_a_catalogue_is_refused_as_one(blob):
    with pytest.raises(CatalogueError, match="malformed catalogue blob"):
        decode_catalogue(blob)
