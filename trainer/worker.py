"""One DeepSpeed data-parallel rank of the policy trainer, run as a Ray actor.

Per train step the controller sends each rank the metadata of its whole prompt groups; the rank
reads the columns straight from the datastore's storage units, computes GRPO advantages per group,
recomputes proximal log-probs with the pre-update weights (AReaL's decoupled objective), then runs
``ppo_minibatches`` optimiser steps of token-normalised decoupled PPO over fixed-count micro-batches.
Collectives (token counts, ZeRO reductions, ZeRO-3 gathers, checkpoints) run over gloo on CPU and
NCCL on GPU; every rank must receive the same sequence of calls.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from areal_like.algorithms import decoupled_ppo_loss, grpo_advantages, token_logprobs
from trainer.batch import MicroBatch, SequenceSample, collate, num_micro_batches, split_even
from trainer.config import TrainConfig

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ["prompt_ids", "response_ids", "behav_logprobs", "versions", "reward"]


@dataclass
class TrainStats:
    """What one rank reports for one train step (the controller averages/sums over ranks)."""

    loss: float
    num_samples: int
    num_tokens: int
    clip_frac: float
    imp_weight_mean: float
    imp_weight_max: float
    capped_frac: float
    behav_prox_logp_diff: float
    """mean |logp_behav - logp_prox| over response tokens: engine vs trainer mismatch."""
    grad_norm: float
    lr: float
    reward_mean: float
    adv_abs_mean: float
    fetch_s: float
    prox_s: float
    update_s: float


class TrainerRank:
    def __init__(
        self,
        config: TrainConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model_path: str,
        samples_per_rank: int,
        temperature: float,
        seed: int,
    ) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.temperature = temperature
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        import deepspeed
        from transformers import AutoModelForCausalLM

        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        deepspeed.init_distributed(
            dist_backend="nccl" if on_gpu else "gloo",
            auto_mpi_discovery=False,
            verbose=False,
            timeout=datetime.timedelta(seconds=config.dist_timeout_s),
        )
        torch.manual_seed(seed + rank)
        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32)
        self.pad_id = model.config.pad_token_id or 0
        per_minibatch = samples_per_rank // config.ppo_minibatches
        self.micro_per_minibatch = num_micro_batches(per_minibatch, config.micro_batch_size)
        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "gradient_accumulation_steps": self.micro_per_minibatch,
            "train_batch_size": config.micro_batch_size * self.micro_per_minibatch * world_size,
            "zero_optimization": {"stage": config.zero_stage},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": config.lr, "weight_decay": config.weight_decay, "torch_adam": True},
            },
            "scheduler": {
                "type": "WarmupLR",
                "params": {
                    "warmup_min_lr": 0.0 if config.warmup_steps else config.lr,
                    "warmup_max_lr": config.lr,
                    "warmup_num_steps": max(config.warmup_steps, 1),
                    "warmup_type": "linear",
                },
            },
            "gradient_clipping": config.grad_clip,
            "bf16": {"enabled": on_gpu},
            "steps_per_print": 10**9,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config
        )
        logger.info(
            "trainer rank %d/%d ready: ZeRO-%d, %d micro-batches per minibatch",
            rank,
            world_size,
            config.zero_stage,
            self.micro_per_minibatch,
        )

    # ---- the train step ------------------------------------------------------------------------
    def train_step(self, store, samples_meta: list) -> TrainStats:
        """One step on this rank's whole groups (``samples_meta``: datastore SampleMeta records)."""
        t0 = time.perf_counter()
        columns = store.get_data(samples_meta, TRAIN_COLUMNS)
        rewards = torch.tensor([float(c["reward"][0]) for c in columns])
        group_ids = torch.tensor([m.group_id for m in samples_meta])
        advantages = grpo_advantages(rewards, group_ids, std_norm=self.config.adv_std_norm)
        samples = [
            SequenceSample(c["prompt_ids"], c["response_ids"], c["behav_logprobs"], c["versions"], float(a))
            for c, a in zip(columns, advantages.tolist(), strict=True)
        ]
        t1 = time.perf_counter()

        minibatches = [
            [
                collate(part, self.pad_id).to(self.device)
                for part in split_even(mb, self.micro_per_minibatch)
                if part
            ]
            for mb in split_even(samples, self.config.ppo_minibatches)
        ]
        prox = [[self._prox_logp(micro) for micro in mb] for mb in minibatches]
        t2 = time.perf_counter()

        totals = dict(loss=0.0, tokens=0.0, clipped=0.0, imp_sum=0.0, imp_max=0.0, capped=0.0, diff=0.0)
        grad_norm = 0.0
        for mb, mb_prox in zip(minibatches, prox, strict=True):
            global_tokens = self._all_reduce_sum(sum(m.num_loss_tokens for m in mb))
            # The engine averages gradients over ranks; scaling by world_size makes the update the
            # sum of per-token losses over the global batch divided by the global token count.
            scale = self.world_size
            # Every minibatch has exactly gradient_accumulation_steps micro-batches (the config
            # check makes minibatch sizes equal), so DeepSpeed's boundary lands on the last one.
            assert len(mb) == self.micro_per_minibatch, (len(mb), self.micro_per_minibatch)
            for micro, prox_logp in zip(mb, mb_prox, strict=True):
                logits = self.engine(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
                logp = token_logprobs(logits, micro.targets, self.temperature)
                loss, stats = decoupled_ppo_loss(
                    logp,
                    prox_logp,
                    micro.behav_logp,
                    micro.advantages,
                    micro.loss_mask,
                    eps_clip=self.config.eps_clip,
                    eps_clip_high=self.config.eps_clip_high,
                    behav_imp_weight_cap=self.config.behav_imp_weight_cap,
                    use_decoupled_loss=self.config.use_decoupled_loss,
                    loss_denominator=global_tokens,
                )
                self.engine.backward(loss * scale, scale_wrt_gas=False)
                self.engine.step()
                totals["loss"] += loss.item()
                totals["tokens"] += stats.num_tokens
                totals["clipped"] += stats.clipped_tokens
                totals["imp_sum"] += stats.imp_weight_sum
                totals["imp_max"] = max(totals["imp_max"], stats.imp_weight_max)
                totals["capped"] += stats.capped_tokens
                totals["diff"] += stats.behav_prox_abs_diff_sum
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        t3 = time.perf_counter()
        tokens = max(totals["tokens"], 1.0)
        return TrainStats(
            loss=totals["loss"] / self.config.ppo_minibatches,
            num_samples=len(samples),
            num_tokens=int(totals["tokens"]),
            clip_frac=totals["clipped"] / tokens,
            imp_weight_mean=totals["imp_sum"] / tokens,
            imp_weight_max=totals["imp_max"],
            capped_frac=totals["capped"] / max(totals["tokens"] + totals["capped"], 1.0),
            behav_prox_logp_diff=totals["diff"] / tokens,
            grad_norm=grad_norm,
            lr=float(self.engine.get_lr()[0]),
            reward_mean=float(rewards.mean()),
            adv_abs_mean=float(advantages.abs().mean()),
            fetch_s=t1 - t0,
            prox_s=t2 - t1,
            update_s=t3 - t2,
        )

    @torch.no_grad()
    def _prox_logp(self, micro: MicroBatch) -> torch.Tensor:
        if not self.config.use_decoupled_loss:
            return micro.behav_logp
        logits = self.engine(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
        return token_logprobs(logits, micro.targets, self.temperature)

    def _all_reduce_sum(self, value: float) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    # ---- weights out, checkpoints --------------------------------------------------------------
    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 state dict on rank 0 (None on other ranks). Collective under ZeRO-3: every
        rank must call it, and the parameters are gathered in one bucketed call, not one per tensor."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.config.zero_stage == 3):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}

    def weights_digest(self) -> str | None:
        weights = self.export_weights()
        if weights is None:
            return None
        return state_dict_digest(weights)

    def optimizer_step_count(self) -> int:
        return int(self.engine.global_steps)

    def save_checkpoint(self, directory: str) -> None:
        """Model, optimizer and LR scheduler of every rank into ``directory`` (collective)."""
        self.engine.save_checkpoint(directory, tag="trainer", save_latest=False)

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="trainer")
        if path is None:
            raise FileNotFoundError(f"trainer rank {self.rank}: no DeepSpeed checkpoint under {directory!r}")

    def ping(self) -> int:
        return self.rank


def state_dict_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes, order-independent of dict insertion."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name].detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()
