"""``areal-like eval``: pass@1 and pass@k of a checkpoint (or HF model dir) on a local prompt set.

Generation goes through the same engine class the rollout workers use, scoring through the same
reward pool (timeouts and errors score 0 and are counted in the report). pass@k uses the unbiased
estimator 1 - C(n-c, k) / C(n, k) with n = samples per prompt and c = correct samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@dataclass
class PromptResult:
    prompt_id: str
    prompt: str
    """The prompt as sent to the engine (prompt and chat templates applied)."""
    answer: str
    responses: list[str]
    rewards: list[float]


@dataclass
class EvalReport:
    model: str
    data: str
    num_prompts: int
    samples_per_prompt: int
    temperature: float
    pass_at_1: float
    pass_at_k: float
    k: int
    reward_errors: int
    reward_timeouts: int
    prompts: list[PromptResult]


def _run_config(checkpoint_dir: str):
    from areal_like.config import load_config

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
    return load_config(os.path.join(run_dir, "config.yaml"))


def evaluate(
    model: str,
    data: str | None = None,
    k: int = 1,
    samples_per_prompt: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    reward_fn: str | None = None,
    reward_timeout_s: float = 5.0,
    out: str | None = None,
) -> EvalReport:
    """Evaluate ``model`` (a checkpoint dir, a run dir, or an HF model dir) on ``data`` (jsonl/parquet;
    default: the run's held-out prompts). k=1 with the default temperature 0 is greedy pass@1."""
    import torch

    from areal_like.core.data import load_prompts
    from areal_like.core.models import load_model, load_tokenizer
    from areal_like.core.tokenizer import stop_token_ids
    from areal_like.prompts import PromptFormat, PromptRecords, load_prompt_records, tokenize_prompts
    from rollout.engine import SamplingParams
    from rollout.hf_engine import HFEngine
    from rollout.rewards import RewardPool

    n = samples_per_prompt or k
    if k < 1 or n < k:
        raise ValueError(f"eval: need 1 <= k <= samples per prompt, got k={k}, samples_per_prompt={n}")
    temperature = (0.0 if n == 1 else 1.0) if temperature is None else temperature
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))

    if os.path.exists(os.path.join(model, "config.json")):
        policy, tokenizer, run_config = load_model(model), load_tokenizer(model), None
        model_dir = model
    else:
        from areal_like.export import load_policy, resolve_checkpoint

        checkpoint_dir = resolve_checkpoint(model)
        policy, tokenizer = load_policy(checkpoint_dir)
        run_config = _run_config(checkpoint_dir)
        from areal_like.checkpoint import read_state

        model_dir = read_state(checkpoint_dir).model_path

    if data is None and run_config is None:
        raise ValueError("eval: --data is required when evaluating an HF model directory")
    run_prompts = load_prompt_records(run_config.task, run_config.run.seed) if run_config else None
    if data is not None:
        # A run's own field names apply to other files in its format (GSM8K: question/answer).
        keys = (run_config.task.prompt_key, run_config.task.answer_key) if run_config else ()
        records = load_prompts(data, *keys).records
    else:
        assert run_prompts is not None, "checked above: without --data there is a run config"
        records, data = run_prompts.eval, "held-out prompts of the run's task"
    reward_path = reward_fn or (run_prompts.reward_fn_path if run_prompts else None)
    if reward_path is None:
        from areal_like.tasks import get_task

        reward_path = get_task("addition").reward_fn_path
        logger.warning("eval: no --reward-fn given for an HF model dir; using %s", reward_path)
    if max_new_tokens is None:
        max_new_tokens = run_config.rollout.max_new_tokens if run_config else 32
    # The run's prompt and chat templates apply to any prompt set it is evaluated on.
    prompt_format = run_prompts.format if run_prompts else PromptFormat()
    prompt_sets = tokenize_prompts(PromptRecords([], records, reward_path, prompt_format), model_dir)
    records, prompt_ids = prompt_sets.eval, prompt_sets.eval_ids  # text: the prompt as sent

    engine = HFEngine(policy, seed=0)
    stops = stop_token_ids(tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops)
    outputs = engine.generate([ids for ids in prompt_ids for _ in range(n)], params)
    texts = [
        tokenizer.decode([t for t in o.response_ids if t not in stops], skip_special_tokens=True)
        for o in outputs
    ]
    answers = [r.answer for r in records for _ in range(n)]
    with RewardPool(reward_path, num_workers=1, timeout_s=reward_timeout_s) as pool:
        scores = pool.score(list(zip(texts, answers, strict=True)))
        counters = dict(pool.counters)

    results = []
    for i, record in enumerate(records):
        chunk = scores[i * n : (i + 1) * n]
        results.append(
            PromptResult(
                record.prompt_id,
                record.text,
                record.answer,
                texts[i * n : (i + 1) * n],
                [s.value for s in chunk],
            )
        )
    correct = [sum(1 for r in p.rewards if r >= 1.0) for p in results]
    report = EvalReport(
        model=model,
        data=data,
        num_prompts=len(records),
        samples_per_prompt=n,
        temperature=temperature,
        pass_at_1=sum(pass_at_k(n, c, 1) for c in correct) / len(records),
        pass_at_k=sum(pass_at_k(n, c, k) for c in correct) / len(records),
        k=k,
        reward_errors=counters.get("error", 0),
        reward_timeouts=counters.get("timeout", 0),
        prompts=results,
    )
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(report), f, indent=2)
        os.replace(tmp, out)
    return report
