"""TTT Lens command line.

    python -m ttt_core prepare            convert the embedded SmolLM2 once (safetensors cache)
    python -m ttt_core info [--model M]   print the model card as JSON

Errors go to stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from ttt_core.models import EMBEDDED_MODEL, ModelLoadError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _prepare(args: argparse.Namespace) -> int:
    from ttt_core.models import convert_embedded

    t0 = time.perf_counter()
    folder = convert_embedded()
    print(f"embedded model ready in {folder} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from ttt_core.models import load_model

    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    print(json.dumps(lm.card(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ttt_core", description="TTT Lens command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF to a safetensors cache once")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("info", help="print the model card as JSON")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local folder, or the embedded default")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
