"""One DeepSpeed data-parallel rank of the trainer, run as a Ray actor.

A train step, as every rank runs it (the controller calls ``train_step`` on all ranks at once):
1. fetch: read the columns of the samples the controller gave this rank; all-gather (sample meta,
   reward, response length) so every rank sees the global batch; shape and normalise the rewards
   (GRPO groups need no locality then); re-split the batch over ranks by token count
   (Karmarkar-Karp / greedy) and fetch the few samples that moved here from the datastore.
2. plan: split into ``ppo_minibatches`` minibatches and each into micro-batches by token budget,
   packed or length-sorted padded; ranks agree on the micro-batch count per minibatch (all-reduce
   max) and pad with empty passes, because ZeRO reduces and gathers inside every forward/backward.
3. no-grad passes with the pre-update weights: proximal log-probs (unless approximated), reference
   log-probs (KL), the critic's old values (PPO); then per-token advantages.
4. update: per minibatch, backward over its micro-batches (loss weights normalised over the
   global minibatch, so ranks and accumulation steps add up to one aggregate) and one optimizer
   step; a step with a non-finite gradient norm is skipped and counted.
5. stats: one all-reduce of sums and one of maxima, so every rank returns the global figures.
Collectives run over gloo on CPU and NCCL on GPU; every rank must receive the same calls.

Sequence parallelism (``train.sequence_parallel`` = N > 1): the W ranks form W / N data-parallel
groups of N consecutive ranks. Step 1 splits the batch over the groups, not the ranks, so every
rank of a group holds the same samples and plans the same micro-batches; every forward (no-grad
passes included) runs through the Ulysses attention on 1/N of each micro-batch's positions and
all-gathers the log-probs (trainer/sequence_parallel.py), so the losses run unchanged. Sums over
the batch (token counts, statistics) take each group once: from its first rank.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import chain

import torch
import torch.distributed as dist

from areal_like.core.digest import state_dict_digest  # noqa: F401 (re-exported for tests)
from areal_like.core.types import TRAJECTORY_COLUMNS
from datastore.types import DataStoreSamplesLost
from trainer import checkpoint_engine
from trainer.advantages import normalize_with, sequence_scores, token_advantages
from trainer.algorithms import (
    kl_estimate,
    loglinear_prox_logp,
    loss_token_weights,
)
from trainer.batch import (
    MicroBatch,
    ResponseLayout,
    SequenceSample,
    collate_micro_batch,
    dummy_micro_batch,
    response_logprobs,
    split_even,
)
from trainer.checkpoint_engine import WriteProgress
from trainer.collectives import all_reduce_floats
from trainer.config import TrainConfig
from trainer.critic import Critic
from trainer.deepspeed_engine import (
    EngineSpec,
    init_distributed,
    load_engine_checkpoint,
    load_train_model,
    make_engine,
)
from trainer.packing import agree_on_micro_batches, balanced_partition, imbalance, keep_local
from trainer.policy_losses import needs_segments, policy_loss, span_segments
from trainer.sequence_parallel import (
    check_model_heads,
    new_sequence_parallel_group,
    sequence_parallel_logprobs,
    use_ulysses,
)
from trainer.stats import TrainStats, check_logp_mismatch, fresh_mismatch, summarize

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "trainer"


@dataclass
class _Minibatch:
    sample_index: list[int]
    micro_batches: list[MicroBatch]


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
        max_new_tokens: int | None = None,
    ) -> None:
        """``samples_per_rank`` is informational (micro-batches are planned per step);
        ``max_new_tokens`` (rollout.max_new_tokens) is needed by the overlong penalty and by
        ``loss_agg: seq_mean_token_sum`` without ``loss_norm_tokens``."""
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.norm_tokens = config.loss_norm_tokens or max_new_tokens
        if config.reward.overlong_tokens and max_new_tokens is None:
            raise ValueError(
                "train.reward.overlong_tokens > 0 needs the trainer's max_new_tokens (rollout's)"
            )
        if config.loss_agg == "seq_mean_token_sum" and self.norm_tokens is None:
            raise ValueError(
                "train.loss_agg=seq_mean_token_sum needs train.loss_norm_tokens (or max_new_tokens)"
            )
        self.sp_size = config.sequence_parallel
        if world_size % self.sp_size:
            raise ValueError(
                f"train.sequence_parallel={self.sp_size} must divide the {world_size} trainer ranks; "
                f"set train.num_ranks to a multiple of {self.sp_size}"
            )
        self.dp_size = world_size // self.sp_size
        self.dp_rank, self.sp_rank = divmod(rank, self.sp_size)
        self.device = init_distributed(rank, world_size, master_addr, master_port, config.dist_timeout_s)
        self.sp_group = None
        if self.sp_size > 1:
            self.sp_group = new_sequence_parallel_group(rank, world_size, self.sp_size)
        torch.manual_seed(seed)  # new weights (a critic's value head) must match on every rank
        spec = EngineSpec.of_train(config)
        model = load_train_model(model_path, spec)
        self._use_sequence_parallel(model)
        self.pad_id = model.config.pad_token_id or 0
        self.engine = make_engine(model, spec, world_size)
        self.ref = None
        if config.kl.coef > 0:
            # A frozen engine: ZeRO-3 shards it like the policy; stages 1-2 only shard optimizer
            # state and gradients, which it has none of, so it runs unsharded (stage 0).
            stage = 3 if config.zero_stage == 3 else 0
            ref_spec = EngineSpec.of_train(config, zero_stage=stage, gradient_checkpointing=False)
            ref_model = load_train_model(config.kl.ref_model_path or model_path, ref_spec)
            self._use_sequence_parallel(ref_model)
            self.ref = make_engine(ref_model, ref_spec, world_size, with_optimizer=False)
        self.critic = None
        if config.algo == "ppo":
            critic_spec = EngineSpec.of_train(
                config, lr=config.critic.lr, weight_decay=config.critic.weight_decay
            )
            self.critic = Critic(config.critic.model_path or model_path, critic_spec, world_size)
        self.checkpoint_io = checkpoint_engine.install(self.engine, self.critic and self.critic.engine)
        self.policy_version = 0
        self.skipped_total = 0
        torch.manual_seed(seed + rank)
        logger.info(
            "trainer rank %d/%d: ZeRO-%d, bf16 %s, algo %s, packing %s, budget %s, ~%d samples/rank, "
            "sequence parallel %d (data-parallel group %d of %d)",
            rank, world_size, config.zero_stage, self.engine.bfloat16_enabled(),
            config.algo, config.packing, config.max_tokens_per_micro_batch, samples_per_rank,
            self.sp_size, self.dp_rank, self.dp_size,
        )  # fmt: skip

    def _use_sequence_parallel(self, model) -> None:
        """Route ``model``'s attention through Ulysses over this rank's group (SP > 1 only)."""
        if self.sp_group is None:
            return
        check_model_heads(model.config, self.sp_size)
        use_ulysses(model, self.sp_group)

    # ---- the train step ------------------------------------------------------------------------
    def train_step(self, store, samples_meta: list, policy_version: int | None = None) -> TrainStats:
        """One step on the global batch (``samples_meta``: this rank's share of datastore SampleMeta
        records; ``policy_version``: version of the current weights, tracked here when None)."""
        cfg = self.config
        if policy_version is not None:
            self.policy_version = policy_version
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        samples, scores, minibatch_sets, batch_stats = self._fetch_batch(store, samples_meta)
        minibatches = self._plan(samples, minibatch_sets)
        layout = ResponseLayout.of(samples)
        t1 = time.perf_counter()

        recompute = cfg.use_decoupled_loss and cfg.prox_logp == "recompute"
        prox = self._no_grad_pass(minibatches, layout, self._policy_logp) if recompute else None
        ref = self._no_grad_pass(minibatches, layout, self._ref_logp) if self.ref is not None else None
        values = self._no_grad_pass(minibatches, layout, self.critic.values) if self.critic else None
        kl_reward = None
        if ref is not None and cfg.kl.placement == "reward":
            old_logp = prox if prox is not None else layout.behav_logp
            kl_reward = kl_estimate(old_logp, ref, cfg.kl.estimator) * layout.loss_mask
        advantages, returns = token_advantages(scores, layout.mask, cfg, kl_reward, values)
        if cfg.adv_batch_norm:
            advantages = self._global_normalize(advantages, layout.loss_mask)
        weights = self._token_weights(minibatches, layout)
        t2 = time.perf_counter()

        tensors = dict(prox=prox, ref=ref, adv=advantages, returns=returns, values=values, weights=weights)
        sums, maxes, step_info = self._update(minibatches, layout, tensors)
        t3 = time.perf_counter()
        self.policy_version += 1
        sums.update(adv_abs=float((advantages.abs() * layout.mask).sum()), update_s=t3 - t2)
        maxes.update(update_s=t3 - t2)
        stats = self._stats(sums, maxes, step_info, batch_stats, len(samples), layout, (t0, t1, t2, t3))
        if self.device.type == "cuda":  # rank 0's figure is the one the metrics row shows
            stats.metrics["perf/trainer_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        module = self.engine.module  # transformers recomputes activations only in train mode
        checkpointing = module.training and getattr(module, "is_gradient_checkpointing", False)
        stats.metrics["train/gradient_checkpointing"] = float(checkpointing)
        return stats

    def _fetch_batch(self, store, samples_meta: list):
        """This rank's samples, their scores, and which of them form each minibatch."""
        cfg = self.config
        lost = None
        try:
            columns = store.get_data(samples_meta, list(TRAJECTORY_COLUMNS))
            local = [
                (m, float(c["reward"][0]), len(c["response_ids"]))
                for m, c in zip(samples_meta, columns, strict=True)
            ]
        except DataStoreSamplesLost as err:
            lost, local = err, None
        # Every rank enters the gather, even one whose samples were lost, so nobody hangs in it;
        # then all ranks drop the batch together.
        gathered = self._all_gather(local)
        if any(part is None for part in gathered):
            raise lost or DataStoreSamplesLost(
                f"trainer rank {self.rank}: another rank's samples were lost with a storage unit", [], [], []
            )
        owned = [(rank, rec) for rank, part in enumerate(gathered) for rec in part]
        # Insertion order, not rank order: minibatches must not depend on the number of ranks.
        owned.sort(key=lambda x: (x[1][0].seq, x[1][0].sample_id))
        owners = [rank for rank, _ in owned]
        groups = [r // self.sp_size for r in owners]  # the data-parallel group holding each sample
        metas = [rec[0] for _, rec in owned]
        rewards = torch.tensor([rec[1] for _, rec in owned], dtype=torch.float32)
        scores = sequence_scores(
            rewards,
            torch.tensor([rec[2] for _, rec in owned]),
            torch.tensor([m.group_id for m in metas]),
            cfg,
            self.max_new_tokens,
        )
        loads = [m.length for m in metas]
        mine: list[int] = []  # global indices of this rank's samples, minibatch by minibatch
        minibatch_sets: list[list[int]] = []  # positions in ``mine``
        before, after = [0] * self.dp_size, [0] * self.dp_size
        for members in split_even(list(range(len(metas))), cfg.ppo_minibatches):
            if cfg.balance == "none" or self.dp_size == 1:
                parts = [[i for i in members if groups[i] == d] for d in range(self.dp_size)]
            else:
                picked = balanced_partition([loads[i] for i in members], self.dp_size, cfg.balance)
                picked = keep_local(picked, [groups[i] for i in members])
                parts = [[members[j] for j in part] for part in picked]
            for d in range(self.dp_size):
                before[d] += sum(loads[i] for i in members if groups[i] == d)
                after[d] += sum(loads[i] for i in parts[d])
            minibatch_sets.append(list(range(len(mine), len(mine) + len(parts[self.dp_rank]))))
            mine += parts[self.dp_rank]
        have = {m.sample_id: c for m, c in zip(samples_meta, columns, strict=True)}
        missing = [metas[i] for i in mine if metas[i].sample_id not in have]
        if missing:
            fetched = store.get_data(missing, list(TRAJECTORY_COLUMNS))
            have.update(zip((m.sample_id for m in missing), fetched, strict=True))
        samples = []
        for i in mine:
            c = have[metas[i].sample_id]
            samples.append(
                SequenceSample(
                    c["prompt_ids"], c["response_ids"], c["behav_logprobs"], c["versions"], c["loss_mask"]
                )
            )
        batch_stats = dict(
            reward_mean=float(rewards.mean()) if len(rewards) else 0.0,
            imbalance_before=imbalance(before),
            imbalance_after=imbalance(after),
            moved=float(len(missing)),
        )
        return samples, scores[mine], minibatch_sets, batch_stats

    def _plan(self, samples: list[SequenceSample], index_sets: list[list[int]]) -> list[_Minibatch]:
        cfg = self.config
        plans = agree_on_micro_batches(
            [[samples[i].length for i in idx] for idx in index_sets],
            cfg.max_tokens_per_micro_batch,
            cfg.micro_batch_size,
            cfg.packing,
            lambda values: self._all_reduce(values, dist.ReduceOp.MAX),
        )
        minibatches = []
        for idx, parts in zip(index_sets, plans, strict=True):
            micro = [self._collate(samples, [idx[j] for j in part]) for part in parts]
            minibatches.append(_Minibatch(idx, [m.to(self.device) for m in micro]))
        return minibatches

    def _collate(self, samples: list[SequenceSample], indices: list[int]) -> MicroBatch:
        if not indices:
            return dummy_micro_batch(self.pad_id)
        cfg = self.config
        return collate_micro_batch(
            samples,
            indices,
            cfg.packing,
            cfg.attn_implementation,
            self.pad_id,
            cfg.max_tokens_per_micro_batch,
        )

    def _logprobs(self, model, micro: MicroBatch, with_entropy: bool = False):
        """Log-probs (and entropy) [B, L] of ``micro``'s targets, 0 off the scored positions; with
        sequence parallelism every rank of the group gets the whole [B, L] from its shard's part."""
        if self.sp_group is None:
            return response_logprobs(model, micro, self.temperature, with_entropy)
        return sequence_parallel_logprobs(
            model,
            micro.input_ids,
            micro.position_ids,
            micro.targets,
            self.sp_group,
            self.temperature,
            with_entropy,
            keep=micro.scored_positions(),
        )

    def _policy_logp(self, micro: MicroBatch) -> torch.Tensor:
        return self._logprobs(self.engine, micro)[0]

    def _ref_logp(self, micro: MicroBatch) -> torch.Tensor:
        assert self.ref is not None, "a reference model is loaded whenever KL is configured"
        return self._logprobs(self.ref, micro)[0]

    @torch.no_grad()
    def _no_grad_pass(self, minibatches: list[_Minibatch], layout: ResponseLayout, fn) -> torch.Tensor:
        out = layout.zeros()
        for micro in chain.from_iterable(mb.micro_batches for mb in minibatches):
            micro.gather_into(fn(micro), out)
        return out

    def _token_weights(self, minibatches: list[_Minibatch], layout: ResponseLayout) -> torch.Tensor:
        """Loss weight of every model-sampled response token (0 on environment tokens), normalised
        over its global minibatch."""
        local = []
        for mb in minibatches:
            local += [float(layout.loss_mask[mb.sample_index].sum()), float(len(mb.sample_index))]
        totals = self._sum_over_groups(local)
        weights = layout.zeros()
        for m, mb in enumerate(minibatches):
            if mb.sample_index:
                weights[mb.sample_index] = loss_token_weights(
                    layout.loss_mask[mb.sample_index],
                    self.config.loss_agg,
                    totals[2 * m],
                    totals[2 * m + 1],
                    self.norm_tokens,
                )
        return weights

    def _global_normalize(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        total, total_sq, count = self._sum_over_groups(
            [float((advantages * mask).sum()), float((advantages**2 * mask).sum()), float(mask.sum())]
        )
        mean = total / max(count, 1.0)
        var = max(total_sq / max(count, 1.0) - mean**2, 0.0) * count / max(count - 1.0, 1.0)
        return normalize_with(advantages, mask, mean, var**0.5)

    def _update(self, minibatches: list[_Minibatch], layout: ResponseLayout, tensors: dict):
        sums = dict.fromkeys(
            ("loss", "tokens", "clipped", "imp_sum", "capped", "dual", "diff", "mask_tokens", "entropy", "kl",
             "value_loss", "value_clipped", "slots", "real_tokens", "micro_batches", "m2po_masked",
             "fresh_diff", "fresh_tokens", "first_tokens"),
            0.0,
        )  # fmt: skip
        maxes = dict(imp_max=0.0, diff_max=0.0, neg_imp_min=-float("inf"), micro_batches=0.0)
        info = dict(grad_norm=0.0, critic_grad_norm=0.0, skipped=0)
        for m, mb in enumerate(minibatches):
            for micro in mb.micro_batches:
                sums["micro_batches"] += 1
                sums["slots"] += micro.num_slots
                sums["real_tokens"] += micro.num_real_tokens
                self._backward_micro(micro, layout, tensors, sums, maxes, first=m == 0)
            if m == 0:  # before the first optimizer step, so a stopped step changes no weights
                self._guard_logp_mismatch(sums)
            maxes["micro_batches"] = max(maxes["micro_batches"], float(len(mb.micro_batches)))
            grad_norm, skipped = self._optimizer_step()
            info["grad_norm"] = grad_norm
            info["skipped"] += int(skipped)
            if self.critic is not None:
                info["critic_grad_norm"] = self.critic.step()
        return sums, maxes, info

    def _guard_logp_mismatch(self, sums) -> None:
        """Engine vs trainer log-probs on the first minibatch's fresh tokens: warn or stop."""
        cfg = self.config
        if cfg.logp_mismatch_warn is None and cfg.logp_mismatch_stop is None:
            return
        local = [sums["fresh_diff"], sums["fresh_tokens"], sums["first_tokens"]]
        diff_sum, fresh_tokens, loss_tokens = self._sum_over_groups(local)
        check_logp_mismatch(
            cfg, diff_sum, fresh_tokens, loss_tokens, version=self.policy_version, log=self.rank == 0
        )

    def _backward_micro(
        self, micro: MicroBatch, layout: ResponseLayout, tensors: dict, sums, maxes, first: bool = False
    ) -> None:
        cfg = self.config
        behav = micro.scatter(layout.behav_logp)
        weights = micro.scatter(tensors["weights"])
        logp, entropy = self._logprobs(self.engine, micro, with_entropy=True)
        if tensors["prox"] is not None:
            prox = micro.scatter(tensors["prox"])
        elif cfg.use_decoupled_loss:  # loglinear approximation from per-token versions
            prox = loglinear_prox_logp(behav, logp, micro.scatter(layout.versions), self.policy_version)
        else:
            prox = behav
        if first:  # the weights the fresh tokens were sampled with: logp is their trainer score
            diff, fresh = fresh_mismatch(
                behav, logp, micro.scatter(layout.versions), micro.loss_mask, self.policy_version
            )
            sums["fresh_diff"] += diff
            sums["fresh_tokens"] += fresh
            sums["first_tokens"] += float(micro.loss_mask.sum())
        segments = None
        if needs_segments(cfg):
            shape = micro.targets.shape
            segments = span_segments(shape, micro.rows, micro.starts, micro.lengths, self.device)
        adv = micro.scatter(tensors["adv"])
        loss, st = policy_loss(cfg, logp, prox, behav, adv, micro.loss_mask, weights, segments)
        if tensors["ref"] is not None:
            kl = kl_estimate(logp, micro.scatter(tensors["ref"]), cfg.kl.estimator)
            sums["kl"] += float((kl.detach() * micro.loss_mask).sum())
            if cfg.kl.placement == "loss":
                loss = loss + cfg.kl.coef * (kl * weights).sum()
        # The engine averages gradients over all world_size ranks; token weights already divide by
        # the global minibatch, so scaling by world_size makes the update the global aggregate. With
        # sequence parallelism the factor is the same: the ranks of a group hold the loss of the
        # same samples, but each only its shard's part of the gradient, and those parts sum to the
        # group's gradient (world_size x the average = the sum over groups of their gradients).
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if self.critic is not None:
            value_loss, value_clipped = self.critic.backward(
                micro,
                micro.scatter(tensors["values"]),
                micro.scatter(tensors["returns"]),
                weights,
                cfg.critic.value_clip,
            )
            sums["value_loss"] += value_loss
            sums["value_clipped"] += value_clipped
        sums["loss"] += float(loss.item())
        sums["tokens"] += st.num_tokens
        sums["clipped"] += st.clipped_tokens
        sums["imp_sum"] += st.imp_weight_sum
        sums["capped"] += st.capped_tokens
        sums["dual"] += st.dual_clipped_tokens
        sums["m2po_masked"] += st.m2po_masked_tokens
        sums["diff"] += st.behav_prox_abs_diff_sum
        sums["mask_tokens"] += float(micro.loss_mask.sum())
        sums["entropy"] += float((entropy * micro.loss_mask).sum())
        maxes["diff_max"] = max(maxes["diff_max"], st.behav_prox_abs_diff_max)
        if st.num_tokens:
            maxes["imp_max"] = max(maxes["imp_max"], st.imp_weight_max)
            maxes["neg_imp_min"] = max(maxes["neg_imp_min"], -st.imp_weight_min)

    def _optimizer_step(self) -> tuple[float, bool]:
        """One optimizer step; a non-finite gradient norm skips it (DeepSpeed's ZeRO optimizers
        check it themselves; without ZeRO the check is here) and counts it."""
        skipped_before = self.engine.skipped_steps
        if self.config.zero_stage == 0 and not self._grads_finite():
            self.engine.zero_grad()
            self.engine.skipped_steps += 1
        else:
            self.engine.step()
        skipped = self.engine.skipped_steps > skipped_before
        if skipped:
            self.skipped_total += 1
            logger.warning("rank %d: non-finite gradient norm, optimizer step skipped", self.rank)
            return float("nan"), True
        return float(self.engine.get_global_grad_norm() or 0.0), False

    def _grads_finite(self) -> bool:
        bad = any(
            p.grad is not None and not torch.isfinite(p.grad).all() for p in self.engine.module.parameters()
        )
        return self._all_reduce([float(bad)], dist.ReduceOp.MAX)[0] == 0.0

    def _stats(self, sums, maxes, info, batch, num_samples, layout, times) -> TrainStats:
        keys, mkeys = sorted(sums), sorted(maxes)
        totals = dict(zip(keys, self._sum_over_groups([sums[k] for k in keys]), strict=True))
        peaks = dict(zip(mkeys, self._all_reduce([maxes[k] for k in mkeys], dist.ReduceOp.MAX), strict=True))
        info = dict(info, lr=float(self.engine.get_lr()[0]), skipped_total=self.skipped_total)
        # The controller adds the ranks' counts: a sequence-parallel group reports its samples once.
        first = self.sp_rank == 0
        return summarize(
            self.config,
            self.dp_size,
            totals,
            peaks,
            info,
            batch,
            num_samples if first else 0,
            int(layout.mask.sum()) if first else 0,
            times,
        )

    # ---- collectives ---------------------------------------------------------------------------
    def _all_reduce(self, values: list[float], op) -> list[float]:
        return all_reduce_floats(values, op, self.world_size, self.device)

    def _sum_over_groups(self, values: list[float]) -> list[float]:
        """Sums over the data-parallel groups: the ranks of a sequence-parallel group hold the same
        samples and compute the same figures from them, so only each group's first rank adds its
        values. Without sequence parallelism, the sum over ranks."""
        if self.sp_rank:
            values = [0.0] * len(values)
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def _all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

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

    def setup_realloc(self, plan, config, master_addr: str, master_port: int, ipc_handles=None) -> None:
        """Join the weight-reallocation group as member ``rank`` (every engine joins at once).
        Colocated placement: ``ipc_handles`` (engine rank -> ``IpcHandle``) are the staging arenas of
        the engines on this GPU; this rank maps the ones it hosts and writes into them."""
        from areal_like.core.realloc.executor import ReallocExecutor
        from areal_like.core.realloc.ipc import open_ipc_staging

        previous = getattr(self, "realloc", None)
        self.realloc = ReallocExecutor.rejoin(previous, plan, self.rank, config, master_addr, master_port)
        self.realloc_staging = {
            e: open_ipc_staging(plan, ipc_handles[e]) for e in plan.hosted_by(self.rank) if ipc_handles
        }

    def send_weights(self, version: int):
        """This rank's part of the reallocation plan for ``version`` (collective with the engines)."""
        from areal_like.core.realloc.sources import flat_sources

        sources = flat_sources(self.engine.module, self.rank, self.world_size)
        return self.realloc.run(version, sources=sources, staging=self.realloc_staging)

    def weights_digest(self) -> str | None:
        weights = self.export_weights()
        if weights is None:
            return None
        return state_dict_digest(weights)

    def save_checkpoint(self, directory: str, background: bool = False) -> WriteProgress:
        """Model, optimizer, LR scheduler (and critic) of every rank into ``directory`` (collective).
        ``background``: return once the state is copied to host memory; the files are written while
        training goes on (poll ``checkpoint_progress``)."""
        self.checkpoint_io.begin(background)
        state = {"policy_version": self.policy_version, "skipped_total": self.skipped_total}
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=state, save_latest=False)
        if self.critic is not None:
            self.critic.save(directory)
        return self.checkpoint_io.progress()

    def checkpoint_progress(self) -> WriteProgress:
        return self.checkpoint_io.progress()

    def load_checkpoint(self, directory: str, universal: bool = False) -> None:
        """``universal``: ``directory`` was converted from another layout (ranks, ZeRO stage)."""
        path, state = load_engine_checkpoint(self.engine, directory, CHECKPOINT_TAG, universal)
        if path is None:
            raise FileNotFoundError(f"trainer rank {self.rank}: no DeepSpeed checkpoint under {directory!r}")
        self.policy_version = int(state.get("policy_version", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        if self.critic is not None:
            self.critic.load(directory, universal)

    def ping(self) -> int:
        return self.rank
