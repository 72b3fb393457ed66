"""``areal-like bench reward_hang``: seconds per batch when every reward call hangs.

``PYTHONPATH=. areal-like bench reward_hang [--items 512 --timeout 5 --batches 3 --workers 1]``
(from the repository root: the default function lives in tests/unit/reward_fixtures.py)

A ``RewardPool`` scores ``--batches`` batches of ``--items`` calls of a reward function that sleeps
far past ``--timeout`` (``--fn``, by default the test fixture ``sleep_unless_fast``). Every call scores
'timeout'; what matters is how long a batch takes. The first call of the first batch is found waiting
at a quarter of the timeout and the rest run at once; later batches start concurrent. Prints one
line per batch and, last, a JSON object with the seconds and their ratio to the timeout.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import emit


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench reward_hang", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=512, help="calls per batch (32 groups x 16 samples)")
    parser.add_argument("--timeout", type=float, default=5.0, help="task.reward_timeout_s")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="task.reward_workers")
    parser.add_argument("--fn", default="tests.unit.reward_fixtures:sleep_unless_fast")
    parser.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)

    from rollout.rewards import RewardPool

    seconds = []
    with RewardPool(args.fn, num_workers=args.workers, timeout_s=args.timeout) as pool:
        pool.score([("fast", "")])  # workers started and the function imported outside the timing
        for batch in range(args.batches):
            started = time.monotonic()
            results = pool.score([(str(i), "") for i in range(args.items)])
            seconds.append(time.monotonic() - started)
            timeouts = sum(r.status == "timeout" for r in results)
            print(
                f"batch {batch + 1}: {args.items} calls ({timeouts} timed out) in {seconds[-1]:.2f} s "
                f"= {seconds[-1] / args.timeout:.2f} x the {args.timeout:g} s timeout",
                flush=True,
            )
    emit(
        dict(
            bench="reward_hang",
            items=args.items,
            timeout_s=args.timeout,
            workers=args.workers,
            seconds=[round(s, 3) for s in seconds],
            over_timeout=[round(s / args.timeout, 3) for s in seconds],
        ),
        args.out,
    )
    return 0
