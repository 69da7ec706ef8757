# SPDX-License-Identifier: Apache-2.0
"""TEST-ONLY shim that lets vLLM 0.32's Ray executor run on the CPU backend.

Not part of the shipped package; used by ``tests/e2e/test_chain_tp.py`` to exercise
ReDrafter's Ray code paths (plugin loading in Ray actors, TP collectives of the drafter)
on a GPU-less CI machine. **On GPUs Ray needs no shim.**

Upstream vLLM refuses Ray on CPU because ``CpuPlatform.ray_device_key`` is empty
(``vllm/v1/executor/ray_utils.py``, ``ray_executor_v2.py``). The shim, applied in every
vLLM process as a second ``vllm.general_plugins`` entry point (registered only through a
temporary ``*.dist-info`` on ``PYTHONPATH`` by the test):

1. sets ``CpuPlatform.ray_device_key = "GPU"``, so placement groups ask for "GPU" bundles;
2. starts a private Ray instance with fake GPU resources (``num_gpus = world size``)
   before vLLM's ``initialize_ray_cluster`` would start one without them;
3. swaps ``ray_executor_v2.RayWorkerProc`` for a subclass whose
   ``get_node_and_physical_gpu_ids`` returns Ray's fake GPU ids as plain integers (the
   CPU platform cannot map device-control ids). The actor class is pickled by reference,
   so each Ray actor imports this module, and the shim with it.

Also runnable as ``python -m tests.e2e.ray_cpu_shim <json request>``: starts an ``LLM``
with ``distributed_executor_backend="ray"`` and prints one ``RESULT <json>`` line with
the greedy outputs and spec-decode metrics (the test runs it in a fresh interpreter).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

_APPLIED = False


def register() -> None:
    """``vllm.general_plugins`` entry point of the shim (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2, ray_utils

    CpuPlatform.ray_device_key = "GPU"

    original_init = ray_utils.initialize_ray_cluster

    @functools.wraps(original_init)
    def initialize_ray_cluster(parallel_config: Any, *args: Any, **kwargs: Any) -> Any:
        import ray

        if not ray.is_initialized():
            world = parallel_config.world_size
            ray.init(num_cpus=max(world, 2), num_gpus=world, include_dashboard=False,
                     log_to_driver=True)
        return original_init(parallel_config, *args, **kwargs)

    ray_utils.initialize_ray_cluster = initialize_ray_cluster
    ray_executor_v2.initialize_ray_cluster = initialize_ray_cluster
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc
    _APPLIED = True


def _worker_base() -> type:
    from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

    return RayWorkerProc


class CpuRayWorkerProc(_worker_base()):  # type: ignore[misc]
    """RayWorkerProc reporting Ray's fake GPU ids as physical device ids."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        import ray

        register()  # this module was imported by the actor: make sure the shim is on
        context = ray.get_runtime_context()
        ids = context.get_accelerator_ids().get("GPU", [])
        return context.get_node_id(), [int(x) for x in ids]


def _run(request: dict[str, Any]) -> dict[str, Any]:
    """Start a Ray-backed LLM for ``request`` and return outputs and metrics."""
    from tests.e2e.chain_helpers import generate_ids, spec_metrics, vllm_engine

    with vllm_engine(
        model=request["model"],
        skip_tokenizer_init=True,
        tensor_parallel_size=request["tensor_parallel_size"],
        distributed_executor_backend="ray",
        speculative_config=request.get("speculative_config"),
        **request.get("engine_kwargs", {}),
    ) as llm:
        ids = generate_ids(llm, request["prompts"], request["max_tokens"], temperature=0.0)
        return {"ids": ids, "metrics": spec_metrics(llm)}


def main(argv: list[str]) -> None:
    request = json.loads(argv[0])
    result = _run(request)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # Ray's atexit hooks can hang on a loaded CI box; results are out


if __name__ == "__main__":
    main(sys.argv[1:])
