# SPDX-License-Identifier: Apache-2.0
"""A drafter that one node cannot load fails every tensor-parallel rank at once, naming
the rank, the node and the path, and no rank is left waiting in a collective.

Two real processes with a gloo group stand in for two Ray workers on two nodes (the
agreement uses the TP group's CPU group the same way)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_redrafter.integration.spec_config import ReDrafterConfigError
from vllm_redrafter.proposers.redrafter import describe_load_failures, load_on_every_rank


def test_describe_names_every_failed_rank():
    assert describe_load_failures([("a", None), ("b", None)], "the drafter /d") is None
    message = describe_load_failures(
        [("a", None), ("b", "FileNotFoundError: /d/config.json")], "the drafter /d")
    assert "could not load the drafter /d on 1 of 2 tensor-parallel ranks" in message
    assert "rank 1 on node b: FileNotFoundError: /d/config.json" in message
    assert "same path" in message


def _worker(rank: int, port: int, present: str, missing: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def gather(item):  # noqa: ANN001, ANN202
        items = [None, None]
        dist.all_gather_object(items, item)
        return items

    path = present if rank == 0 else missing  # rank 1's "node" lacks the directory

    def load() -> str:
        return Path(path, "config.json").read_text()

    try:
        load_on_every_rank(load, "the drafter", gather)
        result = "loaded"
    except ReDrafterConfigError as exc:
        result = f"refused: {exc}"
    # a collective after the agreement: proves no rank is stuck in the previous one
    dist.barrier()
    Path(out_dir, f"rank{rank}.txt").write_text(result)
    dist.destroy_process_group()


def test_one_rank_missing_the_drafter_fails_every_rank(tmp_path):
    present = tmp_path / "drafter"
    present.mkdir()
    (present / "config.json").write_text("{}")
    missing = tmp_path / "absent-on-this-node"
    port = 29500 + os.getpid() % 1000
    context = mp.start_processes(
        _worker, args=(port, str(present), str(missing), str(tmp_path)), nprocs=2,
        join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a rank stuck in a collective: fail, not hang
            for process in context.processes:
                process.kill()
            pytest.fail("a rank did not finish within 120 s (stuck in a collective?)")
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert results[0] == results[1]  # the same error on both ranks
    assert results[0].startswith("refused: ReDrafter could not load")
    assert "rank 1 on node" in results[0] and str(missing) in results[0]
    assert "rank 0 on node" not in results[0]


def test_every_rank_loads_when_every_node_has_it(tmp_path):
    def gather(item):  # noqa: ANN001, ANN202
        return [item, item]

    assert load_on_every_rank(lambda: 7, "x", gather) == 7
