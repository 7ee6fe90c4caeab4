"""The ranks of one model replica (tp ranks, pipeline stages) agree on which rows were skipped."""

from __future__ import annotations

import pytest
import torch

from distlm.data.stream import MicroBatch
from distlm.train.data import align_skipped_rows
from spawn import spawn_ranks

pytestmark = pytest.mark.distributed


def _align(rank, world_size):
    inputs = torch.arange(12).reshape(3, 4) + 1
    targets = inputs + 100
    errors = None
    if rank == 1:  # only this reader lost row 2 (say, a remote read that gave up)
        inputs[2], targets[2] = 0, -100
        errors = {"events": [("unreachable", "https://host/train-000003.tar", 5, 0)], "rows_skipped": 1}
    clean = MicroBatch(inputs.clone() * 0 + 7, targets.clone() * 0 + 9, None)
    (first, second) = align_skipped_rows([MicroBatch(inputs, targets, errors), clean], None, torch.device("cpu"))
    return first.inputs.tolist(), first.targets.tolist(), first.errors, second.errors, second.targets.tolist()


def test_a_row_skipped_on_one_rank_is_skipped_on_all():
    (a, b) = spawn_ranks(_align, 2)
    assert a[0] == b[0] and a[1] == b[1], "both ranks now hold the same tokens"
    assert a[1][2] == [-100] * 4 and a[0][2] == [0] * 4 and a[1][0][0] == 101
    assert a[2] == {"rows_skipped": 1}  # rank 0 learns it has one row fewer to weigh
    assert b[2]["events"] and b[2]["rows_skipped"] == 1  # rank 1 keeps its event for the counters
    assert a[3] is None and b[3] is None and a[4] == [[9] * 4] * 3  # an untouched micro-batch stays as it was
