"""The data sets `streamrec datasets` knows: one `Dataset` entry each, nothing else to change.

Adding a data set is one entry in `CATALOGUE`: where the publisher serves it, the SHA-256 of the
archive and/or of the files the loaders read (with the source of each pinned hash in a comment),
the loader format, and the licence terms a user must see before using it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUPLENS_LICENSE = (
    "GroupLens terms: research use only, no redistribution without permission, no endorsement "
    "implied; cite F. M. Harper and J. A. Konstan, The MovieLens Datasets: History and Context, "
    "ACM TiiS 5(4), 2015"
)


class DatasetError(Exception):
    """A data set could not be found, downloaded, verified or installed; the message says why."""


@dataclass(frozen=True)
class Dataset:
    """One downloadable data set.

    `folder` is the top-level folder inside the archive whose files become the cached copy (the
    files land directly in `$STREAMREC_HOME/datasets/<name>/`). `files` pins the SHA-256 of files
    inside that folder; `archive_sha256` pins the archive itself. At least one must be set, or
    nothing could be verified. `format` is the `streamrec.stream.loaders` format of the folder.
    """

    name: str
    title: str
    url: str
    format: str
    license: str
    size: int | None = None  # archive bytes, when pinned
    archive_sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    folder: str = ""
    max_extracted_bytes: int = 256 * 2**20  # zip-bomb cap on everything extracted

    def __post_init__(self) -> None:
        if not self.archive_sha256 and not self.files:
            raise ValueError(f"data set {self.name}: pin archive_sha256 or the SHA-256 of its files")

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "title": self.title, "size": self.size, "license": self.license,
                "url": self.url, "format": self.format, "archive_sha256": self.archive_sha256,
                "pinned_files": sorted(self.files)}


CATALOGUE: dict[str, Dataset] = {
    entry.name: entry
    for entry in (
        Dataset(
            name="ml-100k",
            title="MovieLens 100K (100,000 ratings, 943 users, 1,682 movies, 1998)",
            url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
            format="ml-100k",
            license=GROUPLENS_LICENSE,
            # size and archive hash: tensorflow/datasets, tensorflow_datasets/url_checksums/movielens.txt;
            # the same hash is pinned by several independent projects (e.g. DHE and bandit studies).
            size=4_924_029,
            archive_sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            # per-file hashes: computed from an extracted copy of that archive; u.data and u.item
            # match the values published beside the archive hash above by independent projects.
            files={
                "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
                "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
                "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
                "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
                "u.occupation": "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d",
                "u.info": "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b",
                "README": "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
            },
            folder="ml-100k",
            max_extracted_bytes=64 * 2**20,  # ~16 MB extracted
        ),
        Dataset(
            name="ml-1m",
            title="MovieLens 1M (1,000,209 ratings, 6,040 users, 3,706 movies, 2003)",
            url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            format="ml-1m",
            license=GROUPLENS_LICENSE,
            # size and archive hash: tensorflow/datasets, tensorflow_datasets/url_checksums/movielens.txt;
            # cross-checked: tensorflow/examples, lite/examples/recommendation/ml/data/
            # example_generation_movielens.py (MOVIELENS_ZIP_HASH). No per-file hashes are published,
            # so a folder copy cannot be verified: import the zip.
            size=5_917_549,
            archive_sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            folder="ml-1m",
            max_extracted_bytes=128 * 2**20,  # ~25 MB extracted
        ),
    )
}


def dataset(name: str) -> Dataset:
    """The catalogue entry `name`, or a DatasetError that lists the known names."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(sorted(CATALOGUE))}") from None
