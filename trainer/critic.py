"""PPO's value model: a token-level value head on the policy's backbone, on its own DeepSpeed engine.

The trainer rank owns it. Per step: ``values`` over every micro-batch before any update (the old
values for GAE and value clipping), then per minibatch ``backward`` on each micro-batch and one
``step``. It follows the policy's micro-batch plan, so every rank issues the same collectives.
"""

from __future__ import annotations

import torch

from trainer.algorithms import value_loss
from trainer.batch import MicroBatch
from trainer.deepspeed_engine import EngineSpec, load_engine_checkpoint, load_train_model, make_engine

CHECKPOINT_TAG = "critic"


class Critic:
    def __init__(self, model_path: str, spec: EngineSpec, world_size: int) -> None:
        self.world_size = world_size
        self.engine = make_engine(load_train_model(model_path, spec, value_head=True), spec, world_size)

    def _forward(self, micro: MicroBatch) -> torch.Tensor:
        return self.engine(**micro.model_inputs()).logits.squeeze(-1).float()

    @torch.no_grad()
    def values(self, micro: MicroBatch) -> torch.Tensor:
        """V(s_t) at every target position of ``micro`` [B, L] with the current weights."""
        return self._forward(micro)

    def backward(
        self,
        micro: MicroBatch,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        token_weights: torch.Tensor,
        value_clip: float | None,
    ) -> tuple[float, float]:
        """Accumulate the gradient of this micro-batch's share of the minibatch value loss.
        Returns (loss share, clipped tokens)."""
        values = self._forward(micro)
        loss, num_clipped = value_loss(values, old_values, returns, token_weights, value_clip)
        # The engine averages gradients over ranks; the token weights already divide by the global
        # minibatch, so scaling by world_size makes the update the global aggregate.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        return float(loss.item()), num_clipped

    def step(self) -> float:
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or 0.0)

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: str, universal: bool = False) -> None:
        path, _ = load_engine_checkpoint(self.engine, directory, CHECKPOINT_TAG, universal)
        if path is None:
            raise FileNotFoundError(f"no critic checkpoint (tag {CHECKPOINT_TAG!r}) under {directory!r}")
