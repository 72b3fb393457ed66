"""A background checkpoint of a trainer rank holds the state of the step it was taken at, although
the rank trains on while it is written, and a fresh rank restored from it repeats the next step
exactly (policy, critic, optimizer and scheduler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.checkpoint_manifest import crc32_of
from tests.integration.test_trainer_dist import CASES, _rank, make_batch
from tests.spawned import run_spawned
from trainer.config import KLConfig

pytestmark = pytest.mark.slow

RESUME = dict(CASES["ppo_critic"], zero_stage=2, optimizer="adamw", lr=1e-2, warmup_steps=2)
RESUME.update(lr_schedule="cosine", max_steps=4, kl=KLConfig(coef=0.05, placement="loss"))


def _weights(trainer) -> dict[str, np.ndarray]:
    """Policy and critic weights as numpy (tensors would cross the process boundary as handles)."""
    engines = {"policy": trainer.engine, "critic": trainer.critic.engine}
    return {
        f"{name}.{k}": v.detach().numpy().copy()
        for name, engine in engines.items()
        for k, v in engine.module.state_dict().items()
    }


def _job(port, model_dir, ckpt_dir, out):
    torch.set_num_threads(1)
    store, metas = make_batch()
    first = _rank(RESUME, 0, 1, port, model_dir)
    first.train_step(store, metas)
    first.train_step(store, metas)
    at_save = _weights(first)
    started = first.save_checkpoint(ckpt_dir, background=True)
    stats_a = first.train_step(store, metas)  # trains while the files are written
    while not (progress := first.checkpoint_progress()).done:
        pass
    second = _rank(RESUME, 0, 1, port, model_dir)
    second.load_checkpoint(ckpt_dir)
    restored, version = _weights(second), second.policy_version
    stats_b = second.train_step(store, metas)
    out.put(("async", dict(
        started_done=started.done, progress=progress, at_save=at_save, restored=restored,
        after_a=_weights(first), after_b=_weights(second), version=version,
        loss=(stats_a.loss, stats_b.loss), lr=(stats_a.lr, stats_b.lr),
        crc_on_disk={f.path: crc32_of(f.path) for f in progress.files},
    )))  # fmt: skip


def test_a_background_checkpoint_resumes_exactly(tmp_path):
    from areal_like.core.models import ModelBuildConfig, build_model
    from areal_like.core.net import free_port

    tiny = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    model_dir = build_model(tiny, str(tmp_path / "model"))
    result = run_spawned([(_job, (free_port("127.0.0.1"), model_dir, str(tmp_path / "ckpt")))])["async"]
    progress = result["progress"]
    assert progress.error is None
    names = sorted(f.path.rsplit("/", 2)[-2] + "/" + f.path.rsplit("/", 1)[-1] for f in progress.files)
    assert "critic/mp_rank_00_model_states.pt" in names and "trainer/mp_rank_00_model_states.pt" in names
    assert all(result["crc_on_disk"][f.path] == f.crc32 for f in progress.files)  # checksums of the bytes
    for key, value in result["at_save"].items():  # the state of step 2, not of step 3
        assert np.array_equal(result["restored"][key], value), key
    assert result["version"] == 2
    assert result["lr"][0] == result["lr"][1] and result["loss"][0] == result["loss"][1]
    for key, value in result["after_a"].items():
        assert np.array_equal(result["after_b"][key], value), key
