"""Parameter reallocation: new weights from the trainer layout to every generation engine's layout.

Dataflow, once per run and then once per train step:

    controller: specs (trainer rank 0) + layouts --make_plan--> Plan --(once, to every member)-->
    trainer rank r (member r)        ReallocExecutor.run(v, sources=flat_sources(module, r, N))
        | buckets (>= 256 MiB on GPU), several senders at once, double-buffered, private groups
        v
    engine host (member N+e, or the colocated trainer rank)  ReallocExecutor.run(v, staging=...)
        then engine.update_weights(staging, v): the swap is atomic at a token boundary

- ``layout``: TensorSpec, SourceLayout (ZeRO-0/1/2 replicated, ZeRO-3 flat partitions),
  DestinationLayout (engine names, TP slices, fused tensors); ``qwen2``: the HF <-> vLLM table.
- ``plan``: pure Python; who sends which rectangle to whom in which bucket; ``Plan.format()``.
- ``pack``: the byte layout of buckets and staging arenas (torch); ``execute_locally`` as a reference.
- ``executor``: ``ReallocExecutor``, the same code over gloo (CPU) and NCCL (GPU), with timeouts
  that name the members that did not answer; ``group``: its private store and process groups.
- ``ipc``: colocated placement, trainer ranks writing into engines' staging over CUDA IPC.
- ``sources``: specs and flat sources of a (DeepSpeed) module on the trainer side;
  ``synthetic``: seeded weights laid out as trainer ranks hold them (benchmarks, tests).
Who blocks whom and how failures surface: see ``executor``. This package namespace holds only the
pure-Python part (no torch import); import ``executor``, ``pack``, ``ipc``, ``sources`` directly.
Nothing imports CUDA-only code at module level; NCCL and IPC need a GPU only when used.
"""

from areal_like.core.realloc.config import ReallocConfig
from areal_like.core.realloc.layout import (
    DestinationLayout,
    EngineTensor,
    Placement,
    Rect,
    SourceLayout,
    TensorSpec,
    replicated_destination,
)
from areal_like.core.realloc.plan import Plan, make_plan, split_hosts
from areal_like.core.realloc.qwen2 import Qwen2Dims, hf_destination, vllm_destination

__all__ = [
    "DestinationLayout",
    "EngineTensor",
    "Placement",
    "Plan",
    "Qwen2Dims",
    "ReallocConfig",
    "Rect",
    "SourceLayout",
    "TensorSpec",
    "hf_destination",
    "make_plan",
    "replicated_destination",
    "split_hosts",
    "vllm_destination",
]
