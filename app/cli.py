"""The `selavpr` command line: one entry point, a module per sub-command under app/commands/."""

from __future__ import annotations

import argparse
import logging
import sys

from app.commands import calibrate, embed, evaluate, index, localize, match, serve, train, weights
from model.errors import SelavprError

COMMANDS = (weights, embed, match, index, localize, serve, evaluate, calibrate, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selavpr", description="SelaVPR visual place recognition")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except (SelavprError, ValueError) as exc:  # user-facing: the message says what to fix
        print(f"selavpr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
