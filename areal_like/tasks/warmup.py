"""A short supervised warm-up on a task's demonstrations, before RL (``task.warmup_steps``).

Tasks that teach a format first (the calculator's tool calls) provide demonstrations as token ids
laid out exactly as their rollouts are: prompt, then the model's turns and the environment's tokens
with a loss mask. ``warm_up`` trains the policy on them in this process (plain AdamW on the CPU,
the trainer's micro-batch collation and log-prob function, so the loss mask means what it means in
RL: only the model's tokens are learned), and writes the result as a model directory. It runs once
per run directory; a resumed run finds the directory and skips it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable

from areal_like.config import ConfigError, TaskConfig
from areal_like.tasks.calculator import TAG_TOKENS, Demonstration, warmup_demonstrations

logger = logging.getLogger(__name__)

WARMUP_BATCH = 128
"""Demonstrations per warm-up step (packed into rows, so short ones cost little)."""
WARMUP_LR = 3e-3
"""AdamW learning rate of the warm-up (tiny models from scratch; constant)."""
WARMUP_PROMPTS = 4096
"""Distinct training prompts the demonstrations are made from."""
WARMUP_THREADS = 1
"""torch intra-op threads of the warm-up: on a busy 2-core machine a second thread makes the small
matrices of a tiny model several times slower, not faster."""

DEMONSTRATIONS: dict[str, Callable[..., list[Demonstration]]] = {"calculator": warmup_demonstrations}
"""Tasks that have warm-up demonstrations: name -> fn(records, tokenizer, seed)."""
ADDED_TOKENS: dict[str, tuple[str, ...]] = {"calculator": TAG_TOKENS}
"""Tokens a task's warm-up adds to the tokenizer (new embedding rows) before it trains."""


def warm_up(task_cfg: TaskConfig, model_dir: str, run_dir: str, seed: int) -> str:
    """``model_dir`` after ``task_cfg.warmup_steps`` supervised steps, saved in run_dir/warmup_model
    (reused when it exists). ConfigError when the task has no demonstrations."""
    import numpy as np
    import torch

    from areal_like.core.models import load_model, load_tokenizer
    from areal_like.tasks import make_task
    from trainer.batch import SequenceSample

    out_dir = os.path.join(run_dir, "warmup_model")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    if task_cfg.name not in DEMONSTRATIONS:
        raise ConfigError(
            f"task.warmup_steps={task_cfg.warmup_steps}: task {task_cfg.name!r} has no warm-up "
            f"demonstrations (tasks with some: {sorted(DEMONSTRATIONS)}); set task.warmup_steps=0"
        )
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    if tokenizer.add_tokens(list(ADDED_TOKENS.get(task_cfg.name, ()))):
        model.resize_token_embeddings(len(tokenizer))
    records = make_task(task_cfg).make_prompts("train", WARMUP_PROMPTS, seed)
    demos = DEMONSTRATIONS[task_cfg.name](records, tokenizer, seed)
    samples = [
        SequenceSample(
            np.asarray(d.prompt_ids),
            np.asarray(d.response_ids),
            np.zeros(len(d.response_ids), np.float32),
            np.zeros(len(d.response_ids), np.int64),
            np.asarray(d.loss_mask),
        )
        for d in demos
    ]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(WARMUP_THREADS)
    try:
        model, log = _train(model, samples, task_cfg.warmup_steps, seed)
    finally:
        torch.set_num_threads(threads_before)
    _save(model, tokenizer, out_dir)
    with open(os.path.join(run_dir, "warmup.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in log)
    seconds = log[-1]["seconds"]
    logger.info("warm-up: %d steps, %d demonstrations, %.0fs -> %s", len(log), len(demos), seconds, out_dir)
    return out_dir


def _train(model, samples, num_steps: int, seed: int):
    """AdamW on the loss-masked negative log-likelihood; returns the model and a log line per step."""
    import numpy as np
    import torch

    from trainer.algorithms import sft_loss, token_logprobs
    from trainer.batch import collate_micro_batch

    model.train()
    pad_id = model.config.pad_token_id or 0
    attention = model.config._attn_implementation
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    rng = np.random.default_rng(seed)
    log, start = [], time.perf_counter()
    for step in range(1, num_steps + 1):
        batch = rng.choice(len(samples), size=min(WARMUP_BATCH, len(samples)), replace=False).tolist()
        micro = collate_micro_batch(samples, batch, True, attention, pad_id)
        logp = token_logprobs(model(**micro.model_inputs()).logits, micro.targets)
        loss = sft_loss(logp, micro.loss_mask / micro.loss_mask.sum().clamp(min=1.0))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start})
        if step % 50 == 0 or step == num_steps:
            print(f"warm-up step {step}/{num_steps}: loss {loss.item():.4f}", flush=True)
    return model, log


def _save(model, tokenizer, out_dir: str) -> None:
    """Write the model directory atomically (a crash leaves no half-written warm-up model)."""
    tmp_dir = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.eval().save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
