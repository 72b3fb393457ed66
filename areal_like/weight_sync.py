"""Trainer -> engines after every train step, and the check that they agree.

Two paths behind one ``push(version)``:
- object store (default): trainer rank 0 exports its full fp32 state dict once into Ray's object
  store (a collective gather under ZeRO-3); every engine in rotation loads it at its next token
  boundary. Workers that die or time out are retired by the rollout supervisor on the way.
- reallocation plan (``realloc.enabled``): built once from the model config (trainer layout from
  ``train.zero_stage`` / ``num_ranks`` -> HF engines); every step the trainer ranks send their parts
  in buckets over the plan's own process group and each worker stages all of them before its engine
  swaps. Every member takes part in every transfer. When the rotation changed (a worker retired
  and replaced) or a transfer failed (a member died or timed out), every member joins a fresh group
  on a new port with the current rotation and the transfer runs once more; replacements start
  generating only after that sync.
Either way ``push`` returns only when every engine reports the new version; the controller advances
the dispatcher after that.
Every engine kind takes the same two paths behind the engine interface (``rollout/engine.py``): the
plan targets the engines' own layout (``plan_destination``: the HF state dict in float32, or vLLM's
fused parameters in its dtype) and each engine hosts its receiver (vLLM's in its engine core, an
NCCL member under split placement). Colocated placement (vLLM): each engine allocates a staging
arena that its GPU's trainer rank maps over CUDA IPC and writes into (``realloc/ipc.py``); the
engines then load it (``load_staged``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray

from areal_like.config import Config

logger = logging.getLogger(__name__)


class WeightSync:
    def __init__(self, config: Config, model_path: str, trainers: list, rollout, wait: Callable) -> None:
        """``rollout`` is the RolloutSupervisor; ``wait(refs, role, what, timeout_s=None)`` the
        controller's bounded ``ray.get`` that names late actors."""
        self.config = config
        self.trainers = trainers
        self.rollout = rollout
        self._wait = wait
        self.model_path = model_path
        self.members: list = []
        self.member_ids: list[int] = []
        self.colocated = False
        self.rebuilds_total = 0
        if config.realloc.enabled:
            self._join_plan(model_path)

    def push(self, version: int) -> None:
        if self.config.realloc.enabled:
            if self.rollout.active_ids != self.member_ids:  # a worker was retired and replaced
                self._rebuild("the rollout workers changed")
            try:
                self._push_by_plan(version)
            except Exception as err:  # a member died or timed out mid-transfer; engines kept old weights
                logger.error("weights v%d through the plan failed (%s); rebuilding the group", version, err)
                self.rollout.check()  # retires the dead (and replaces them, unstarted)
                self._rebuild(f"transfer of v{version} failed")
                self._push_by_plan(version)  # a second failure ends the run
            self.rollout.start_replacements()
            return
        refs = [t.export_weights.remote() for t in self.trainers]
        self._wait(refs, "trainer", "export weights")
        self.rollout.update_weights(
            refs[0], version, timeout_s=self.config.rollout.weight_update_timeout_s + 30
        )

    def trainer_digest(self) -> str:
        """sha256 of the trainer's weights (rank 0 answers; the others return None)."""
        digests = self._wait([t.weights_digest.remote() for t in self.trainers], "trainer", "digest")
        return next(d for d in digests if d)

    def engines_match_trainer(self) -> tuple[bool, str]:
        """(every engine in rotation holds exactly the trainer's weights, the trainer's sha256)."""
        trainer = self.trainer_digest()
        engines = self._wait(
            [w.weights_digest.remote() for w in self.rollout.active], "rollout worker", "digest"
        )
        if any(d != trainer for d in engines):
            logger.error("engine weights differ from the trainer's after the last sync")
        return all(d == trainer for d in engines), trainer

    def _rebuild(self, why: str) -> None:
        self.rebuilds_total += 1
        logger.warning("rebuilding the weight-reallocation group (%s)", why)
        self._join_plan(self.model_path)

    def _join_plan(self, model_path: str) -> None:
        from transformers import AutoConfig

        from areal_like.core.realloc import Qwen2Dims, SourceLayout, make_plan
        from areal_like.core.realloc.ipc import colocated_hosts
        from rollout.engine import plan_destination

        cfg = self.config
        self.members = list(self.rollout.active)
        self.member_ids = list(self.rollout.active_ids)
        self.colocated = cfg.placement.devices == "colocated"
        dims = Qwen2Dims.from_config(AutoConfig.from_pretrained(model_path, local_files_only=True))
        n, m = len(self.trainers), len(self.members)
        engine = cfg.rollout.engine_config()
        plan = make_plan(
            SourceLayout.for_zero_stage(dims.specs(engine.weights_dtype), n, cfg.train.zero_stage),
            plan_destination(engine, dims, m),
            cfg.realloc.bucket_bytes,
            hosts=colocated_hosts(n, m) if self.colocated else None,
            checksum=cfg.realloc.checksum,
        )
        logger.info("weight reallocation plan:\n%s", plan.format())
        [(host, port)] = self._wait(
            [self.trainers[0].__ray_call__.remote(_free_port_here)], "trainer", "free port", timeout_s=120
        )
        if self.colocated:
            handles = self._wait(
                [w.make_arena.remote(plan, i) for i, w in enumerate(self.members)], "rollout worker", "arena"
            )
            refs = [t.setup_realloc.remote(plan, cfg.realloc, host, port, handles) for t in self.trainers]
        else:
            refs = [t.setup_realloc.remote(plan, cfg.realloc, host, port) for t in self.trainers]
            refs += [
                w.setup_realloc.remote(plan, cfg.realloc, host, port, n + i, i)
                for i, w in enumerate(self.members)
            ]
        self._wait(
            refs, "realloc member", "join the weight group", timeout_s=cfg.realloc.connect_timeout_s + 30
        )

    def _push_by_plan(self, version: int) -> None:
        timeout_s = self.config.realloc.timeout_s * 4 + self.config.rollout.weight_update_timeout_s
        refs = [t.send_weights.remote(version) for t in self.trainers]
        if self.colocated:  # trainer ranks write into the arenas; then every engine loads its own
            self._wait(refs, "trainer", f"weights v{version} into the arenas", timeout_s=timeout_s)
            refs = []
        refs += [
            (w.load_staged if self.colocated else w.receive_weights).remote(version) for w in self.members
        ]
        loaded = self._wait(refs, "realloc member", f"weights v{version}", timeout_s=timeout_s)
        loaded = loaded[-len(self.members) :]
        assert all(v == version for v in loaded), (loaded, version)


def _free_port_here(_actor) -> tuple[str, int]:
    """(node IP, a free port) where the calling actor runs; the plan group's store lives there."""
    from areal_like.core.net import free_port

    return ray.util.get_node_ip_address(), free_port()
