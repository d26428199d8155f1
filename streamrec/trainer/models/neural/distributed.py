"""Data-parallel fits of the torch families: one process per rank, DistributedDataParallel.

`streamrec refit --nproc N` (and `evaluate --nproc N`) start N copies of the command under
`torchrun` (`launch.py`); each joins the process group here (gloo on CPU, nccl on GPU). Every rank
loads the same log, builds the same split and draws the same batches (the same seeds), then trains
on its own contiguous slice of each batch; DDP averages the gradients, so a step sees the whole
batch and the global batch size is `batch_size` whatever N is (each rank's share shrinks). Every
rank applies the same averaged step, so replicas stay equal and validation, early stopping and the
popularity blend decide the same on all of them without talking. Rank 0 alone writes and
publishes (`streamrec.trainer.ranks.is_primary`).

Only families whose batches are independent examples can be sliced this way (`data_parallel` on
the class): the pointwise ones (NCF, Wide & Deep, DeepFM, DCN, DCN-v2) and YouTube DNN. DSSM's
batch is its in-batch negatives, and GRU4Rec's and Caser's are session-parallel lanes with state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from streamrec.trainer.ranks import requested, world

Batch = tuple[torch.Tensor, ...]


def join(device: torch.device) -> None:
    """Join the process group torchrun describes (once per process)."""
    if requested() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def local_part(batch: Batch, rank: int, size: int) -> Batch:
    """This rank's contiguous slice of every tensor of a batch (first dimension)."""
    rows = len(batch[0])
    start, stop = rank * rows // size, (rank + 1) * rows // size
    return tuple(tensor[start:stop] for tensor in batch)


class LossOf(nn.Module):
    """A network and its loss as one module, so DDP hooks the gradients of everything the loss
    touches: the families compute their loss from several of the network's parts, not one forward."""

    def __init__(self, network: nn.Module, loss: Callable[[Batch], torch.Tensor]) -> None:
        super().__init__()
        self.network = network
        self._loss = loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self._loss(batch)


def parallel_loss(network: nn.Module, loss: Callable[[Batch], torch.Tensor]) -> Callable[[Batch], torch.Tensor | None]:
    """`loss` on this rank's part of each batch, with gradients averaged over the ranks (DDP); a
    batch with fewer rows than ranks is skipped (None) on every rank alike. Outside a process
    group: `loss` itself."""
    rank, size = world()
    if size == 1:
        return loss
    wrapped = nn.parallel.DistributedDataParallel(LossOf(network, loss), find_unused_parameters=True)

    def step(batch: Batch) -> torch.Tensor | None:
        if len(batch[0]) < size:
            return None
        return wrapped(*local_part(batch, rank, size))

    return step
