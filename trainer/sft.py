"""Supervised fine-tuning on prompt/response jsonl, on the RL trainer's DeepSpeed engine.

``run_sft(config)`` starts ``num_ranks`` Ray actors (``SFTRank``), waits for them to train, has
rank 0 write a Hugging Face model directory (weights + tokenizer) into ``output_dir``, and returns
an ``SFTResult``. Every rank reads the whole file and draws the same shuffled order each epoch, so
a batch's samples are split over ranks by token count (Karmarkar-Karp) without talking; the loss is
the negative log-likelihood of response tokens, token-mean over the global batch (across ranks and
micro-batches), exactly as the RL loss is normalised. Rank 0 appends one line per optimizer step
to ``output_dir/sft_metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from areal_like.core.net import free_port
from trainer.algorithms import loss_token_weights, sft_loss
from trainer.batch import SequenceSample, collate_micro_batch, dummy_micro_batch, response_logprobs
from trainer.collectives import all_reduce_floats
from trainer.config import LR_SCHEDULES, OPTIMIZERS, check_one_of
from trainer.deepspeed_engine import EngineSpec, init_distributed, load_train_model, make_engine
from trainer.packing import agree_on_micro_batches, balanced_partition

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    """Supervised fine-tuning of a local HF model on a prompt/response jsonl file."""

    model_path: str = ""
    """Local HF model directory to start from."""
    train_path: str = ""
    """Local .jsonl (or .parquet) with one {prompt, response} record per line."""
    output_dir: str = ""
    """Where the fine-tuned HF model directory (and sft_metrics.jsonl) is written."""
    prompt_key: str = "prompt"
    """Field of the prompt text."""
    response_key: str = "response"
    """Field of the target response text."""
    append_eos: bool = True
    """Append the tokenizer's eos token to every response (the model learns to stop)."""
    max_seq_len: int | None = None
    """Truncate prompt + response to this many tokens (the response is cut); null keeps all."""
    epochs: int = 1
    """Passes over the file."""
    batch_size: int = 32
    """Sequences per optimizer step, over all ranks."""
    num_ranks: int = 1
    """DeepSpeed data-parallel ranks (Ray actors)."""
    seed: int = 1
    """Shuffling seed."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    bf16: bool = True
    """bf16 on GPU; CPU always trains in fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass."""
    offload_optimizer: bool = False
    """ZeRO-Offload of the optimizer to CPU (zero_stage >= 1)."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa, eager or flash_attention_2 (GPU)."""
    fp32_lm_head: bool = False
    """Multiply the output head in fp32 (logits in fp32 under bf16; costs 4 bytes x vocabulary per
    token of a micro-batch). No effect on CPU."""
    optimizer: str = "adamw"
    """adamw or sgd."""
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: str = "cosine"
    """constant, linear or cosine after warm-up."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of lr."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables); non-finite norms skip the step."""
    micro_batch_size: int = 16
    """Sequences per forward/backward when max_tokens_per_micro_batch is null."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of a micro-batch (overrides micro_batch_size)."""
    packing: bool = True
    """Pack sequences without padding."""
    torch_threads: int = 1
    """torch intra-op threads per rank."""
    dist_timeout_s: float = 600.0
    """Timeout of every collective."""
    timeout_s: float = 24 * 3600.0
    """Longest the driver waits for training to finish."""

    def __post_init__(self) -> None:
        for name in ("model_path", "train_path", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"sft.{name} is empty; set it (a local path)")
        for name in ("epochs", "batch_size", "num_ranks", "micro_batch_size", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name}={getattr(self, name)}: must be >= 1")
        if self.batch_size < self.num_ranks:
            raise ValueError(
                f"sft.batch_size={self.batch_size} < sft.num_ranks={self.num_ranks}: no work for some ranks"
            )
        if self.lr <= 0:
            raise ValueError(f"sft.lr={self.lr}: must be > 0")
        check_one_of("sft.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_one_of("sft.optimizer", self.optimizer, OPTIMIZERS)
        check_one_of("sft.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("sft.offload_optimizer=true needs sft.zero_stage >= 1 (ZeRO-Offload)")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"sft.max_seq_len={self.max_seq_len}: must be >= 2 or null")


@dataclass
class SFTResult:
    """What the driver gets back from rank 0."""

    output_dir: str
    num_samples: int
    num_steps: int
    losses: list[float] = field(default_factory=list)
    """Global token-mean NLL of every optimizer step."""
    skipped_steps: int = 0
    tokens_per_s: float = 0.0


def load_sft_samples(config: SFTConfig, tokenizer) -> list[SequenceSample]:
    """Tokenise every record: prompt ids, then response ids (+ eos); loss only on the response."""
    from areal_like.core.data import load_prompts

    records = load_prompts(config.train_path, config.prompt_key, config.response_key).records
    samples = []
    for r in records:
        prompt = tokenizer.encode(r.text, add_special_tokens=False)
        response = tokenizer.encode(r.answer, add_special_tokens=False)
        if config.append_eos and tokenizer.eos_token_id is not None:
            response.append(tokenizer.eos_token_id)
        if config.max_seq_len is not None:
            response = response[: max(config.max_seq_len - len(prompt), 0)]
        if not prompt or not response:
            continue  # nothing to predict
        zeros = np.zeros(len(response))
        samples.append(
            SequenceSample(np.asarray(prompt), np.asarray(response), zeros, zeros.astype(np.int64))
        )
    if not samples:
        raise ValueError(f"{config.train_path}: no record has both a prompt and a (kept) response")
    return samples


class SFTRank:
    """One data-parallel rank of SFT (a Ray actor, or a plain object in a spawned process)."""

    def __init__(self, config: SFTConfig, rank: int, world_size: int, master_addr: str, master_port: int):
        from transformers import AutoTokenizer

        torch.set_num_threads(config.torch_threads)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = init_distributed(rank, world_size, master_addr, master_port, config.dist_timeout_s)
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path, local_files_only=True)
        self.samples = load_sft_samples(config, self.tokenizer)
        self.steps_per_epoch = math.ceil(len(self.samples) / config.batch_size)
        spec = EngineSpec.of_train(config, total_steps=config.epochs * self.steps_per_epoch)
        model = load_train_model(config.model_path, spec)
        self.pad_id = model.config.pad_token_id or 0
        self.engine = make_engine(model, spec, world_size)

    def train(self) -> SFTResult:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        result = SFTResult(cfg.output_dir, len(self.samples), 0)
        tokens, started = 0, time.perf_counter()
        metrics_path = os.path.join(cfg.output_dir, "sft_metrics.jsonl")
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(self.samples))
            for start in range(0, len(order), cfg.batch_size):
                batch = [int(i) for i in order[start : start + cfg.batch_size]]
                loss, skipped, batch_tokens = self._step(batch)
                result.num_steps += 1
                result.losses.append(loss)
                result.skipped_steps += int(skipped)
                tokens += batch_tokens
                if self.rank == 0:
                    record = {"step": result.num_steps, "epoch": epoch, "loss": loss, "skipped": skipped}
                    record["lr"] = float(self.engine.get_lr()[0])
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    logger.info("sft step %d: loss %.4f lr %.2e", result.num_steps, loss, record["lr"])
        result.tokens_per_s = tokens / max(time.perf_counter() - started, 1e-9)
        return result

    def _step(self, batch: list[int]) -> tuple[float, bool, int]:
        """One optimizer step on the global batch ``batch`` (indices into the samples)."""
        cfg = self.config
        lengths = [self.samples[i].length for i in batch]
        mine = [batch[j] for j in balanced_partition(lengths, self.world_size, "kk")[self.rank]]
        (plan,) = agree_on_micro_batches(
            [[self.samples[i].length for i in mine]],
            cfg.max_tokens_per_micro_batch,
            cfg.micro_batch_size,
            cfg.packing,
            lambda values: self._all_reduce(values, dist.ReduceOp.MAX),
        )
        local_tokens = sum(self.samples[i].num_response_tokens for i in mine)
        (global_tokens,) = self._all_reduce([local_tokens], dist.ReduceOp.SUM)
        loss_sum = 0.0
        for part in plan:
            indices = [mine[j] for j in part]
            if indices:
                micro = collate_micro_batch(
                    self.samples,
                    indices,
                    cfg.packing,
                    cfg.attn_implementation,
                    self.pad_id,
                    cfg.max_tokens_per_micro_batch,
                )
            else:
                micro = dummy_micro_batch(self.pad_id)
            micro = micro.to(self.device)
            logp, _ = response_logprobs(self.engine, micro)
            weights = loss_token_weights(micro.loss_mask, "token_mean", global_tokens, 1.0)
            loss = sft_loss(logp, weights)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            loss_sum += float(loss.item())
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        (global_loss,) = self._all_reduce([loss_sum], dist.ReduceOp.SUM)
        return global_loss, self.engine.skipped_steps > skipped_before, sum(lengths)

    def save(self) -> str | None:
        """Rank 0 writes the HF model directory (collective under ZeRO-3)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(
            list(module.parameters()), enabled=self.config.zero_stage == 3
        ):
            if self.rank != 0:
                return None
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(self.config.output_dir, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(self.config.output_dir)
        return self.config.output_dir

    def _all_reduce(self, values: list[float], op) -> list[float]:
        return all_reduce_floats(values, op, self.world_size, self.device)


def run_sft(config: SFTConfig) -> SFTResult:
    """Train ``config.model_path`` on ``config.train_path`` with ``num_ranks`` Ray actors and write
    the fine-tuned model into ``config.output_dir``. Starts a local Ray instance if none is running."""
    import ray

    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
    port = free_port("127.0.0.1")
    actor = ray.remote(SFTRank).options(num_cpus=0, max_concurrency=1)
    ranks = [actor.remote(config, r, config.num_ranks, "127.0.0.1", port) for r in range(config.num_ranks)]
    try:
        results = ray.get([r.train.remote() for r in ranks], timeout=config.timeout_s)
        ray.get([r.save.remote() for r in ranks], timeout=config.dist_timeout_s)
    finally:
        for r in ranks:
            ray.kill(r)
        if owns_ray:
            ray.shutdown()
    return results[0]
