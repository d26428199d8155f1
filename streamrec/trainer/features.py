"""Side features of users and items (MovieLens `u.user` / `u.item`), aligned with an `Interactions`.

Neural models that can use demographics, genres or titles read them here. Every model must still
work without them (generic CSV logs have none): `load_side_features` then returns the id-only
`SideFeatures.empty(...)`, and a model's `side_features` note in `params`/progress says so.

Categorical codes are 1-based; 0 means "unknown" (a user or item missing from the side files, or a
value never seen), so code 0 can be an embedding row that stays neutral.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.stream.catalogue import movielens_genres, read_movielens
from streamrec.trainer.interactions import IdIndex
from streamrec.trainer.models.base import Capabilities

AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age buckets: <18, 18-24, ..., 56+
USER_FIELDS = ("age", "gender", "occupation", "zip")
ITEM_FIELDS = ("decade",)


@dataclass(frozen=True)
class SideFeatures:
    """Codes per user/item (row = index in the model's IdIndex) and their vocabulary sizes."""

    user_codes: np.ndarray  # (n_users, len(user_cards)) int64, 0 = unknown
    user_cards: tuple[int, ...]  # rows per field, including the unknown row 0
    item_codes: np.ndarray  # (n_items, len(item_cards)) int64
    item_cards: tuple[int, ...]
    genres: np.ndarray  # (n_items, n_genres) float32 multi-hot (n_genres may be 0)
    titles: tuple[str, ...]  # one per item ("" where unknown)
    source: str  # where they came from, or why there are none

    @classmethod
    def empty(cls, n_users: int, n_items: int, reason: str) -> SideFeatures:
        """Id-only: no fields at all."""
        return cls(
            np.zeros((n_users, 0), np.int64), (), np.zeros((n_items, 0), np.int64), (),
            np.zeros((n_items, 0), np.float32), ("",) * n_items, reason,
        )

    @property
    def has_any(self) -> bool:
        return bool(self.user_cards or self.item_cards or self.genres.shape[1])


def _codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """Strings -> 1-based codes in sorted vocabulary order (deterministic); NaN -> 0."""
    vocab = sorted(v for v in values.dropna().unique())
    lookup = {v: n + 1 for n, v in enumerate(vocab)}
    return values.map(lookup).fillna(0).to_numpy(np.int64), len(vocab) + 1


def _align(frame: pd.DataFrame, index: IdIndex) -> pd.DataFrame:
    """Rows of `frame` (indexed by id string) in the order of `index`; missing ids -> NaN rows."""
    return frame.reindex(pd.Index(index.ids, dtype=object))


def _user_table(path: Path, users: IdIndex) -> tuple[np.ndarray, tuple[int, ...]]:
    frame = pd.read_csv(
        path, sep="|", header=None, names=["id", "age", "gender", "occupation", "zip"],
        dtype=str, encoding="latin-1",
    ).set_index("id")
    frame = _align(frame, users)
    age = pd.to_numeric(frame["age"], errors="coerce")
    columns = {
        "age": pd.Series(np.where(age.isna(), np.nan, np.searchsorted(AGE_EDGES, age, "right")),
                         index=frame.index).map(lambda v: None if np.isnan(v) else str(int(v))),
        "gender": frame["gender"],
        "occupation": frame["occupation"],
        "zip": frame["zip"].str[:1].where(frame["zip"].str[:1].str.isdigit()),
    }
    coded = [_codes(columns[name]) for name in USER_FIELDS]
    return np.stack([c for c, _ in coded], axis=1), tuple(n for _, n in coded)


def _item_table(path: Path, items: IdIndex) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, tuple[str, ...]]:
    """Decade codes, genre flags and titles, read by the catalogue's u.item reader (one parser: a
    second one here split titles that hold `|` into the wrong columns)."""
    catalogue = read_movielens(path)
    names = movielens_genres(path)
    flags = np.zeros((len(catalogue), len(names)), np.float32)
    if "genre" in catalogue.categorical:
        for column, name in enumerate(names):
            flags[catalogue.categorical["genre"].holding(name), column] = 1.0
    frame = pd.DataFrame({"year": catalogue.numeric.get("year", np.full(len(catalogue), np.nan)),
                          "title": catalogue.text.get("title", np.full(len(catalogue), "", object)),
                          "row": np.arange(len(catalogue))}, index=pd.Index(catalogue.ids, dtype=object))
    frame = _align(frame, items)
    decade = frame["year"].map(lambda y: None if np.isnan(y) else str(int(y) // 10 * 10))
    codes, card = _codes(decade)
    row = frame["row"].to_numpy()
    known = ~np.isnan(row)
    genres = np.zeros((len(row), len(names)), np.float32)
    genres[known] = flags[row[known].astype(np.int64)]
    titles = tuple(frame["title"].fillna("").astype(str))
    return codes[:, None], (card,), genres, titles


def side_files_folder(data: str | Path, fmt: str) -> str | None:
    """The folder of a MovieLens-100K log's side files (`u.user`, `u.item`), or None (another
    format, or a folder without them). `evaluate`, `tune` and `refit` give it to the models that read side
    features when `--param side_data` is not given: a newcomer's `evaluate --model deepfm --data
    ml-100k` then measures the model the README reports, not its id-only variant."""
    if fmt != "ml-100k":
        return None
    folder = _folder_of_side_files(data)
    return str(folder.resolve()) if folder is not None else None


def _folder_of_side_files(path: str | Path) -> Path | None:
    """`path` (a folder, or a file in it) when the folder holds `u.user` or `u.item`."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    return folder if (folder / "u.user").exists() or (folder / "u.item").exists() else None


def with_side_data(model: type, params: dict[str, object], given: Collection[str], data: str | Path,
                   fmt: str) -> dict[str, object]:
    """`params` with `side_data` set to the log's side files (`side_files_folder`) for a model
    class that reads side features, unless `side_data` was `given` (`--param side_data=` keeps
    it id-only). Online models declare no capabilities and read none."""
    capabilities: Capabilities | None = getattr(model, "capabilities", None)
    if capabilities is None or not capabilities.side_features or "side_data" in given:
        return params
    folder = side_files_folder(data, fmt)
    return {**params, "side_data": folder} if folder else params


def load_side_features(folder: str | Path | None, users: IdIndex, items: IdIndex) -> SideFeatures:
    """Demographics, decade, genres and titles from a MovieLens-100K folder; id-only if absent."""
    if not folder:
        return SideFeatures.empty(len(users), len(items), "none (no side_data folder given)")
    found = _folder_of_side_files(folder)
    if found is None:
        return SideFeatures.empty(len(users), len(items), f"none (no u.user/u.item in {folder})")
    user_file, item_file = found / "u.user", found / "u.item"
    empty = SideFeatures.empty(len(users), len(items), "")
    user_codes, user_cards = _user_table(user_file, users) if user_file.exists() else (empty.user_codes, ())
    if item_file.exists():
        item_codes, item_cards, genres, titles = _item_table(item_file, items)
    else:
        item_codes, item_cards, genres, titles = empty.item_codes, (), empty.genres, empty.titles
    return SideFeatures(user_codes, user_cards, item_codes, item_cards, genres, titles, str(found))


def stable_hash(token: str, buckets: int) -> int:
    """A process-independent hash (Python's `hash` is salted per process)."""
    return zlib.crc32(token.encode("utf-8")) % buckets


def trigram_bags(texts: list[str] | tuple[str, ...], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """DSSM word hashing: each text -> hashed letter trigrams of its words ('#toy#' -> #to, toy, oy#).

    Returns CSR-like (indices, offsets) for `torch.nn.EmbeddingBag`.
    """
    indices: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(indices))
        for word in text.lower().split():
            padded = f"#{word}#"
            indices.extend(stable_hash(padded[n : n + 3], buckets) for n in range(len(padded) - 2))
    return np.asarray(indices, np.int64), np.asarray(offsets, np.int64)
