"""Command line: ``python -m helpers profile NAME`` and ``python -m helpers build-tiny [--force] [--quiet]``.

Each subcommand is a ``_cmd_*`` function registered in ``_build_parser``; add one the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_profile(args: argparse.Namespace) -> int:
    """Print a profile's settings as JSON (no hardware check: ``full`` prints on a CPU machine too)."""
    from helpers.profiles import get_profile

    try:
        profile = get_profile(args.name, check_hardware=False)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(profile.to_json())
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    """Build (or reuse from the cache) the tiny chat model and print its folder."""
    from helpers.tiny_model import build_tiny_model

    print(build_tiny_model(force=args.force, progress=not args.quiet))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    profile = commands.add_parser("profile", help="print a profile's settings as JSON")
    profile.add_argument("name", metavar="NAME", help="tiny, t4 or full")
    profile.set_defaults(handler=_cmd_profile)

    build = commands.add_parser("build-tiny", help="build the tiny chat model (cached) and print its folder")
    build.add_argument("--force", action="store_true", help="rebuild even when the cache has it")
    build.add_argument("--quiet", action="store_true", help="no progress bars (for logs)")
    build.set_defaults(handler=_cmd_build_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
