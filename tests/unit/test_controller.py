"""The controller's waits: every call to another actor has a deadline and names who did not answer."""

from __future__ import annotations

import time

import pytest

from areal_like import controller as controller_module
from areal_like.config import load_config
from areal_like.controller import RLController


def test_a_silent_dispatcher_stops_the_controller_naming_it_and_the_call(ray_local, tmp_path, monkeypatch):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class SilentDispatcher:
        def set_version(self, version: int) -> None:
            time.sleep(60)

    monkeypatch.setattr(controller_module, "_DISPATCHER_TIMEOUT_S", 1.0)
    controller = RLController(load_config("configs/quickstart.yaml", [f"run.dir={tmp_path}"]))
    controller.dispatcher = SilentDispatcher.remote()
    try:
        with pytest.raises(TimeoutError, match=r"dispatcher \[0\] did not finish 'set_version' within 1s"):
            controller.start_rollouts()
    finally:
        ray.kill(controller.dispatcher)
