"""The ``mtserve`` command.

    mtserve serve --checkpoint DIR --tp 2 --port 8080    serve a checkpoint (OpenAI API)
    mtserve demo                                         run the demo regression suite
    mtserve make-tiny-checkpoint DIR                     write the tiny test checkpoint
    mtserve convert-hf SRC DST                           Hugging Face Llama -> Megatron checkpoint
    mtserve bundle OUT [--with-eval]                     offline install archive for a GPU host
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_BENCHMARKS = "mmlu,arc_challenge,arc_easy"
DEMO_LIMITS = "50,arc_easy=100,mmlu=1"  # mmlu: per subject (57 subjects, 5-shot prompts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server owns its options (shared with python -m pytest_mtserve.server)
        from pytest_mtserve.server.main import main as serve

        return serve(argv[1:], prog="mtserve serve")
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="serve a Megatron checkpoint over an OpenAI-compatible API (see mtserve serve --help)")

    demo = commands.add_parser("demo", help="run the demo regression suite on SmolLM2-135M (downloads it once)")
    demo.add_argument("--limit-samples", default=DEMO_LIMITS, help=f"questions per benchmark, NAME=N per benchmark (mmlu: per subject); default {DEMO_LIMITS}")
    demo.add_argument("--benchmarks", default=DEMO_BENCHMARKS, help=f"comma-separated benchmarks (default: {DEMO_BENCHMARKS})")
    demo.add_argument("pytest_args", nargs=argparse.REMAINDER, help="further pytest options, after --")
    demo.set_defaults(run=_run_demo)

    tiny = commands.add_parser("make-tiny-checkpoint", help="write a small deterministic random Llama-style checkpoint")
    tiny.add_argument("directory", type=Path, help="run directory to create (iter_0000001 goes inside)")
    tiny.set_defaults(run=_run_make_tiny)

    convert = commands.add_parser("convert-hf", help="convert a Hugging Face Llama-family folder to a Megatron checkpoint")
    convert.add_argument("source", type=Path, help="folder with config.json, *.safetensors and tokenizer files")
    convert.add_argument("destination", type=Path, help="run directory to create")
    convert.set_defaults(run=_run_convert_hf)

    bundle = commands.add_parser("bundle", help="write an offline install archive (wheels + install.sh) for a GPU host")
    bundle.add_argument("output", type=Path, metavar="OUT",
                        help="the archive's path (NAME.tar.xz), or a folder to write mtserve-bundle-py<version>.tar.xz into")
    bundle.add_argument("--python-version", default="3.12", help="the GPU host's Python, e.g. 3.12 (default)")
    bundle.add_argument("--platform", action="append", dest="platforms", metavar="TAG",
                        help="wheel platform tag, repeatable (default: manylinux x86_64 tags)")  # fmt: skip
    bundle.add_argument("--with-eval", action="store_true", help="also bundle nemo-evaluator and nvidia-lm-eval")
    bundle.set_defaults(run=_run_bundle)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    import pytest

    extra = [a for a in args.pytest_args if a != "--"]
    return int(pytest.main([
        "--pyargs", "pytest_mtserve.suite", "-p", "no:cacheprovider",
        "--checkpoint", "demo", "--benchmarks", args.benchmarks, "--limit-samples", args.limit_samples,
        # The = form: pytest reads a separate path as a test path before plugins load.
        f"--baselines-dir={demo_baselines_dir()}", *extra,
    ]))  # fmt: skip


def demo_baselines_dir() -> Path:
    """The demo's committed baselines: ``baselines/`` of the source tree this package runs from."""
    return Path(__file__).resolve().parent.parent / "baselines"


def _run_make_tiny(args: argparse.Namespace) -> int:
    from pytest_mtserve.server.tiny_checkpoint import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.directory))
    return 0


def _run_convert_hf(args: argparse.Namespace) -> int:
    from pytest_mtserve.demo.hf_to_megatron import convert_hf_checkpoint

    print(convert_hf_checkpoint(args.source, args.destination))
    return 0


def _run_bundle(args: argparse.Namespace) -> int:
    from pytest_mtserve.bundle import DEFAULT_PLATFORMS, BundleError, build_bundle

    platforms = tuple(args.platforms) if args.platforms else DEFAULT_PLATFORMS
    try:
        archive = build_bundle(args.output, python_version=args.python_version, platforms=platforms, with_eval=args.with_eval)
    except BundleError as error:
        print(f"mtserve bundle: error: {error}", file=sys.stderr)
        return 2
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
