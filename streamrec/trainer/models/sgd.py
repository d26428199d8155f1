"""Shared pieces of the SGD-trained factor models: mini-batches, seeding, zero-row fallbacks."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_thread_count_lock = threading.Lock()
_single_threaded_fits = 0
_threads_before = 1


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread (a context manager, or `@single_threaded()` on a fit method):
    mini-batch steps are too small to split, and on a shared machine intra-op threads contend
    (measured 15x slower BPR epochs with 2 threads under load). Counted, because the setting is
    process-wide and fits may overlap (a blend fits its members on threads): the first fit in
    saves torch's thread count and the last one out restores it."""
    global _single_threaded_fits, _threads_before
    with _thread_count_lock:
        if _single_threaded_fits == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_threaded_fits += 1
    try:
        yield
    finally:
        with _thread_count_lock:
            _single_threaded_fits -= 1
            if _single_threaded_fits == 0:
                torch.set_num_threads(_threads_before)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def factor_tables(n_users: int, n_items: int, k: int, std: float, gen: torch.Generator) -> dict[str, np.ndarray]:
    """The biased factor models' float32 tables: zero biases `bu bi`, then `P` and `Q` drawn from
    N(0, std^2) by `gen` in that order (the models that add tables draw theirs after)."""
    return {
        "bu": np.zeros(n_users, np.float32), "bi": np.zeros(n_items, np.float32),
        "P": (torch.randn(n_users, k, generator=gen) * std).numpy(),
        "Q": (torch.randn(n_items, k, generator=gen) * std).numpy(),
    }


def gather_or_zero(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows of `table` at `index`, zeros where index is -1 (unknown user or item: no signal)."""
    index = np.asarray(index)
    out = table[np.maximum(index, 0)]
    out[index < 0] = 0
    return out


def to_torch_csr(matrix) -> torch.Tensor:
    """scipy CSR -> torch sparse CSR (float32)."""
    matrix = matrix.tocsr()
    with warnings.catch_warnings():  # torch flags CSR tensors as beta on every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return _csr_tensor(matrix)


def _csr_tensor(matrix) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(matrix.indptr.astype(np.int64)),
        torch.from_numpy(matrix.indices.astype(np.int64)),
        torch.from_numpy(matrix.data.astype(np.float32)),
        size=matrix.shape,
        check_invariants=False,  # built from a valid scipy CSR
    )
