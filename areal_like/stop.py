"""Graceful stop on SIGINT/SIGTERM: the first one asks the run to stop after its step (and save a
checkpoint); a second one aborts at once (``KeyboardInterrupt``). The controller polls ``received``
between steps and, while it waits for a batch, every half second; a rollout worker being stopped
abandons the batch it is scoring (``RewardPool.cancel``), so the stop never waits on a slow reward."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class StopRequest:
    """Set by the first SIGINT/SIGTERM once ``install`` has run; the controller polls ``received``."""

    def __init__(self) -> None:
        self.received: str | None = None
        """Name of the signal that asked the run to stop, or None."""

    def install(self) -> Callable[[], None]:
        """Install the handlers (main thread only; elsewhere a no-op); returns a restore function."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, _frame):
            if self.received is not None:
                raise KeyboardInterrupt
            self.received = signal.Signals(signum).name
            print(
                f"\n{self.received}: stopping after this step (at once while waiting for a batch) and "
                "saving a checkpoint (send it again to abort without saving)",
                flush=True,
            )

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore
