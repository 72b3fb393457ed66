"""SFT warm-up, then RL, in one command: build the model of the RL recipe, fine-tune it on the
recipe's training prompts (rendered as the RL run renders them, the ground-truth solutions as
responses), then train the result with RL.

    python scripts/sft_then_rl.py --config configs/gsm8k_cpu.yaml --sft-config configs/sft_gsm8k_cpu.yaml \
        [key=value ...] [sft.key=value ...]

``key=value`` overrides the RL recipe, ``sft.key=value`` the SFT one. Everything lands in run.dir:
init_model/ (the built model), sft_data.jsonl, sft_model/ (the warm-up's output, the RL starting
point), then the RL run's files. Re-running resumes: a finished SFT model is reused and the RL run
continues from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="RL recipe, e.g. configs/gsm8k_cpu.yaml")
    parser.add_argument("--sft-config", required=True, help="SFT recipe, e.g. configs/sft_gsm8k_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value (RL) or sft.key=value (SFT)")
    args = parser.parse_args(argv)

    from areal_like import launch
    from areal_like.config import ConfigError, load_config
    from areal_like.controller import run_training
    from areal_like.prompts import write_sft_data
    from trainer.sft import SFTConfig, run_sft

    sft_overrides = [o.removeprefix("sft.") for o in args.overrides if o.startswith("sft.")]
    try:
        config = load_config(args.config, [o for o in args.overrides if not o.startswith("sft.")])
        run_dir = os.path.abspath(config.run.dir)
        sft_dir = os.path.join(run_dir, "sft_model")
        if os.path.exists(os.path.join(sft_dir, "config.json")):
            print(f"sft: reusing {sft_dir}", flush=True)
        else:
            base = launch.resolve_model_path(config.model, run_dir)
            data = os.path.join(run_dir, "sft_data.jsonl")
            write_sft_data(config.task, config.run.seed, base, data)
            paths = [f"model_path={base}", f"train_path={data}", f"output_dir={sft_dir}"]
            sft_config = load_config(args.sft_config, paths + sft_overrides, schema_class=SFTConfig)
            result = run_sft(sft_config)
            losses = result.losses
            print(
                f"sft done: {result.num_steps} steps over {result.num_samples} samples, loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f}, {result.tokens_per_s:.0f} tok/s -> {sft_dir}",
                flush=True,
            )
        config.model.path = sft_dir
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = run_training(config)
    before = "-" if summary.eval_before is None else f"{summary.eval_before:.3f}"
    after = "-" if summary.eval_after is None else f"{summary.eval_after:.3f}"
    print(
        f"done: RL steps {summary.first_step}->{summary.last_step}, held-out accuracy before {before} "
        f"after {after}, {summary.train_seconds:.0f}s of RL training; run dir {summary.run_dir}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
