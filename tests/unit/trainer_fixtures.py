"""Fixtures shared by the trainer tests: a tiny model config, one compute thread, a corpus."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from swarm_node.train.data import ByteDataset
from swarm_node.train.model import GPTConfig

TINY = GPTConfig(seq_len=32, n_layer=1, n_head=2, d_model=32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # the daemon trains on a single compute thread: check everything works (and is reproducible) that way
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ds() -> ByteDataset:
    return ByteDataset.from_source("stdlib")
