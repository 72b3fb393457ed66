"""The policy losses and corrections on the real system (Ray local, DeepSpeed on gloo, HF engine,
a tiny Qwen2), and the mismatch guard stopping a trainer rank whose temperature is not the
engine's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from areal_like.controller import run_training
from areal_like.core.net import free_port
from tests.integration.test_e2e import read_jsonl, tiny_config
from tests.integration.test_trainer_dist import DictStore, Meta
from tests.spawned import run_spawned

pytestmark = pytest.mark.slow

SHORT = ("train.max_steps=3", "eval.enabled=false", "run.plot=false", "run.save_checkpoints=false")


@pytest.mark.parametrize(
    "loss",
    [
        # CISPO with sequence-level truncated IS (Seq-TIS)
        ("train.policy_loss=cispo", "train.behav_imp_weight_mode=clamp",
         "train.behav_imp_weight_level=sequence", "train.behav_imp_weight_cap=2.0"),
        # GSPO with IcePop: tokens whose trainer/engine ratio leaves [0.5, 2] are masked
        ("train.policy_loss=gspo", "train.behav_imp_weight_floor=0.5", "train.behav_imp_weight_cap=2.0",
         "train.loss_agg=seq_mean_token_mean"),
        # M2PO with sequence-level masked IS (Seq-MIS) on the geometric mean
        ("train.policy_loss=m2po", "train.behav_imp_weight_level=geometric"),
    ],
    ids=["cispo_seq_tis", "gspo_icepop", "m2po_geo_mis"],
)  # fmt: skip
def test_a_short_async_run_trains_with_each_loss(tmp_path, loss):
    run_dir = tmp_path / "run"
    summary = run_training(tiny_config(run_dir, *SHORT, "rollout.max_staleness=1", *loss))
    assert summary.last_step == 3 and summary.engines_in_sync
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # (the rewards of so tiny a run are often all 0: no gradient is promised)
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
    name = loss[0].split("=")[1]
    assert f"policy_loss: {name}" in (run_dir / "config.yaml").read_text()
    # step 1 samples all come from the initial weights: the guard measured them (CPU: ~1e-6)
    assert records[0]["train/logp_mismatch_fresh"] < 1e-3
    if "train.policy_loss=m2po" in loss:
        assert all("train/m2po_masked_frac" in r for r in records)


# ---- the mismatch guard, on one trainer rank --------------------------------------------------------
def _behaviour_batch(model_dir, num_groups=2, group_size=4, seed=0):
    """Samples whose behaviour log-probs are the model's own at temperature 1, all of version 0."""
    from transformers import AutoModelForCausalLM

    from trainer.algorithms import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    rng = np.random.default_rng(seed)
    data, metas = {}, []
    for g in range(num_groups):
        prompt = rng.integers(3, 20, 4).astype(np.int64)
        for i in range(group_size):
            response = rng.integers(3, 20, int(rng.integers(2, 6))).astype(np.int64)
            ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
            with torch.no_grad():
                logp = token_logprobs(model(ids).logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1 :]
            sid = f"{g}:{i}"
            data[sid] = dict(
                prompt_ids=prompt,
                response_ids=response,
                behav_logprobs=logp.numpy().astype(np.float32),
                versions=np.zeros(len(response), dtype=np.int64),
                reward=np.asarray([float(i % 2)], dtype=np.float32),
                loss_mask=np.ones(len(response), dtype=np.int8),
            )
            metas.append(Meta(sample_id=sid, group_id=g, length=len(prompt) + len(response), seq=len(metas)))
    return DictStore(data), metas


def _guard_job(model_dir, port, out):
    from trainer.config import TrainConfig
    from trainer.stats import LogpMismatchError
    from trainer.worker import TrainerRank

    torch.set_num_threads(1)
    store, metas = _behaviour_batch(model_dir)
    results = {}
    for name, temperature in (("same", 1.0), ("wrong", 0.2)):
        cfg = TrainConfig(zero_stage=0)
        trainer = TrainerRank(cfg, 0, 1, "127.0.0.1", port, model_dir, 8, temperature, 0)
        before = trainer.weights_digest()
        try:
            stats = trainer.train_step(store, metas, policy_version=0)
            results[name] = dict(fresh=stats.metrics.get("train/logp_mismatch_fresh"), error=None)
        except LogpMismatchError as err:
            results[name] = dict(fresh=None, error=str(err))
        results[name]["changed"] = trainer.weights_digest() != before
    out.put(("guard", results))


def test_the_mismatch_guard_stops_a_rank_scoring_at_the_wrong_temperature(tmp_path):
    from areal_like.core.models import ModelBuildConfig, build_model

    shape = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    model_dir = build_model(shape, str(tmp_path / "m"))
    job = (_guard_job, (model_dir, free_port("127.0.0.1")))
    results = run_spawned([job], timeout_s=300, what="trainer process")["guard"]
    same, wrong = results["same"], results["wrong"]
    assert same["error"] is None and same["fresh"] < 1e-4 and same["changed"]
    assert wrong["error"] is not None and "train.logp_mismatch_stop=0.25" in wrong["error"]
    assert not wrong["changed"], "the stopped step must not reach the weights"
