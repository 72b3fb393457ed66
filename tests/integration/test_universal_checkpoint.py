"""A trainer checkpoint resumes on another layout through DeepSpeed's universal checkpoint.

Two layouts train the same batches with AdamW (a warm-up and cosine schedule, so the scheduler and
the Adam moments both matter): 2 ranks at ZeRO-2 and 1 rank at ZeRO-3. Each saves after step 2 and
takes step 3. Each checkpoint is then converted (``checkpoint_universal.to_universal``) and loaded
by the *other* layout, which takes step 3 on the same batch: its loss, learning rate and weights
must be what the original layout computed, and the step count must go on from 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.checkpoint_universal import to_universal
from areal_like.core.net import free_port
from tests.integration.test_trainer_dist import _rank, make_batch
from tests.spawned import run_spawned

pytestmark = pytest.mark.slow

ADAMW = dict(optimizer="adamw", lr=1e-2, warmup_steps=2, lr_schedule="cosine", max_steps=4)
LAYOUTS = {"zero2x2": (2, 2), "zero3x1": (1, 3)}  # name -> (ranks, ZeRO stage)


def _weights(trainer) -> dict[str, np.ndarray]:
    import deepspeed

    params = list(trainer.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=trainer.config.zero_stage == 3):
        return {k: v.detach().float().numpy().copy() for k, v in trainer.engine.module.state_dict().items()}


def _step3(trainer, store, metas, rank, world):
    mine = [m for m in metas if m.group_id % world == rank]
    stats = trainer.train_step(store, mine)
    return dict(loss=stats.loss, lr=stats.lr, weights=_weights(trainer), steps=trainer.engine.global_steps)


def _original(name, rank, port, model_dir, ckpt_dir, out):
    """Steps 1-2, save, step 3 on the original layout."""
    torch.set_num_threads(1)
    world, stage = LAYOUTS[name]
    store, metas = make_batch()
    trainer = _rank(dict(ADAMW, zero_stage=stage), rank, world, port, model_dir)
    for _ in range(2):
        trainer.train_step(store, [m for m in metas if m.group_id % world == rank])
    trainer.save_checkpoint(ckpt_dir)
    out.put((f"{name}/{rank}", _step3(trainer, store, metas, rank, world)))


def _resumed(name, rank, port, model_dir, universal_dir, out):
    """A fresh trainer of layout ``name`` loads the other layout's checkpoint and takes step 3."""
    torch.set_num_threads(1)
    world, stage = LAYOUTS[name]
    store, metas = make_batch()
    trainer = _rank(dict(ADAMW, zero_stage=stage), rank, world, port, model_dir)
    trainer.load_checkpoint(universal_dir, universal=True)
    result = dict(version=trainer.policy_version, steps_loaded=trainer.engine.global_steps)
    result.update(_step3(trainer, store, metas, rank, world))
    out.put((f"{name}/{rank}", result))


def _jobs(fn, name, model_dir, directory):
    world, _ = LAYOUTS[name]
    port = free_port("127.0.0.1")
    return [(fn, (name, rank, port, model_dir, directory)) for rank in range(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from areal_like.core.models import ModelBuildConfig, build_model

    tmp = tmp_path_factory.mktemp("universal")
    tiny = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    model_dir = build_model(tiny, str(tmp / "model"))
    ckpt = {name: str(tmp / name) for name in LAYOUTS}
    original = run_spawned([j for name in LAYOUTS for j in _jobs(_original, name, model_dir, ckpt[name])])
    # zero2x2's checkpoint resumes as zero3x1 and the other way round.
    to_universal(ckpt["zero2x2"], str(tmp / "for_zero3x1"), zero_stage=3)
    to_universal(ckpt["zero3x1"], str(tmp / "for_zero2x2"), zero_stage=2)
    resumed = run_spawned(
        _jobs(_resumed, "zero3x1", model_dir, str(tmp / "for_zero3x1"))
        + _jobs(_resumed, "zero2x2", model_dir, str(tmp / "for_zero2x2"))
    )
    return original, resumed


@pytest.mark.parametrize(("source", "target"), [("zero2x2", "zero3x1"), ("zero3x1", "zero2x2")])
def test_a_checkpoint_resumes_on_another_layout_with_the_same_next_step(results, source, target):
    original, resumed = results
    expected = original[f"{source}/0"]
    for rank in range(LAYOUTS[target][0]):
        got = resumed[f"{target}/{rank}"]
        assert got["version"] == 2 and got["steps_loaded"] == 2  # step count continuous
        assert got["steps"] == expected["steps"] == 3
        assert got["lr"] == pytest.approx(expected["lr"], rel=1e-9)  # scheduler carried
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7)  # same first loss
        # Adam's moments carried: without them step 3 would move the weights another way.
        want = expected["weights"]
        worst = max(float(np.abs(got["weights"][k] - want[k]).max()) for k in want)
        assert worst < 2e-5, f"weights after the resumed step differ by up to {worst}"
