"""``areal-like`` command line: parse, build, run, clean up. Heavy imports happen after parsing."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys


def _train(args: argparse.Namespace) -> int:
    from areal_like.config import load_config

    config = load_config(args.config, args.overrides)
    from areal_like.controller import run_training

    summary = run_training(config)
    if summary.stopped_by is not None:
        print(
            f"stopped by {summary.stopped_by} at step {summary.last_step}; re-run the same command to resume"
        )
        return 128 + int(getattr(signal, summary.stopped_by))
    before = "-" if summary.eval_before is None else f"{summary.eval_before:.3f}"
    after = "-" if summary.eval_after is None else f"{summary.eval_after:.3f}"
    print(
        f"done: steps {summary.first_step}->{summary.last_step}, "
        f"held-out accuracy before {before} after {after}, "
        f"max staleness {summary.staleness_max} (eta {config.rollout.max_staleness}), "
        f"{summary.train_seconds:.0f}s of training; run dir {summary.run_dir}",
        flush=True,
    )
    return 0


def _sft(args: argparse.Namespace) -> int:
    from areal_like.config import load_config
    from trainer.sft import SFTConfig, run_sft

    config = load_config(args.config, args.overrides, schema_class=SFTConfig)
    result = run_sft(config)
    print(
        f"sft done: {result.num_steps} steps over {result.num_samples} samples, final loss "
        f"{result.losses[-1] if result.losses else float('nan'):.4f}, {result.tokens_per_s:.0f} tok/s; "
        f"model written to {result.output_dir}"
    )
    return 0


def _build_model(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from areal_like.config import ConfigError
    from areal_like.core.models import ModelBuildConfig, build_model

    try:
        cfg = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ModelBuildConfig), OmegaConf.from_dotlist(args.overrides))
        )
    except Exception as err:
        raise ConfigError(f"model build options {args.overrides}: {err}") from None
    print(build_model(cfg, args.out, overwrite=args.overwrite))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from areal_like.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from areal_like.evaluation import evaluate

    report = evaluate(
        args.checkpoint,
        data=args.data,
        k=args.k,
        samples_per_prompt=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        reward_fn=args.reward_fn,
        out=args.out,
    )
    print(
        f"{report.num_prompts} prompts x {report.samples_per_prompt} samples "
        f"(temperature {report.temperature}): "
        f"pass@1 {report.pass_at_1:.3f}, pass@{report.k} {report.pass_at_k:.3f}"
        + (f"; report {args.out}" if args.out else "")
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from areal_like.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite))
    return 0


def _bench(args: argparse.Namespace) -> int:
    # Benchmark drivers live in the checkout's benchmarks/ (beside their results), not in the
    # installed product packages: put the checkout root on the path when it is not already there.
    from areal_like.config import ConfigError

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(checkout, "benchmarks", "__init__.py")):
        raise ConfigError(f"areal-like bench runs from a source checkout; no benchmarks/ in {checkout}")
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import benchmarks as bench

    try:
        return bench.run(args.name, args.args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="areal-like", description="Asynchronous RL post-training for LLMs.")
    parser.add_argument("--log-level", default=os.environ.get("AREAL_LIKE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run (or resume) RL training from a YAML recipe")
    train.add_argument("--config", required=True, help="YAML recipe, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    train.set_defaults(func=_train)

    sft = sub.add_parser(
        "sft", help="supervised fine-tuning on prompt/response jsonl (same DeepSpeed engine)"
    )
    sft.add_argument("--config", default=None, help="YAML with SFTConfig keys, e.g. configs/sft_example.yaml")
    sft.add_argument(
        "overrides", nargs="*", help="key=value, e.g. model_path=... train_path=... output_dir=..."
    )
    sft.set_defaults(func=_sft)

    build = sub.add_parser("build-model", help="build a small Qwen2 or Qwen3 model + tokenizer locally")
    build.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    build.add_argument("--overwrite", action="store_true")
    build.add_argument("overrides", nargs="*", help="ModelBuildConfig fields as key=value, e.g. num_layers=4")
    build.set_defaults(func=_build_model)

    ev = sub.add_parser("eval", help="pass@1 / pass@k of a checkpoint or HF model dir on a prompt set")
    ev.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, run dir (latest checkpoint) or HF model dir"
    )
    ev.add_argument(
        "--data", default=None, help="jsonl/parquet prompts (default: the run's held-out prompts)"
    )
    ev.add_argument("--k", type=int, default=1)
    ev.add_argument("--samples", type=int, default=None, help="samples per prompt (default: k)")
    ev.add_argument(
        "--temperature", type=float, default=None, help="default: 0 (greedy) for 1 sample, else 1"
    )
    ev.add_argument("--max-new-tokens", type=int, default=None)
    ev.add_argument("--reward-fn", default=None, help="'package.module:function' (default: the run's task)")
    ev.add_argument("--out", default=None, help="write the JSON report here")
    ev.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a checkpoint's policy as a Hugging Face model dir")
    export.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir (latest checkpoint)")
    export.add_argument("--out", required=True)
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=_export)

    plot = sub.add_parser("plot", help="write the learning-curve PNG of a run directory")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None)
    plot.set_defaults(func=_plot)
    bench = sub.add_parser("bench", help="run a benchmark (benchmarks/NAME.py); last line is JSON")
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_bench)
    return parser


# Exit codes: scripts/train.sh retries EXIT_RUNTIME (a resume can succeed) and never EXIT_CONFIG
# (the same command fails the same way until the user changes something).
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _user_errors(command: str, config_error: type[Exception]) -> tuple[type[Exception], ...]:
    """Errors that mean "fix the command or config", for ``command``. For ``train`` only
    ``ConfigError``: a FileNotFoundError there can be a runtime race (a file removed under a
    running job), and a retry may succeed. The other commands only read paths the user named."""
    if command == "train":
        return (config_error,)
    return (config_error, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from areal_like.config import ConfigError
    from areal_like.faults import RunFault

    try:
        return args.func(args)
    except _user_errors(args.command, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RunFault as err:  # a named actor death: the message says what was lost and how to resume
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {err}", file=sys.stderr)  # says what is full and what to do; no traceback
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
