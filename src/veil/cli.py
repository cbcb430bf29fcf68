"""Command line: ``veil demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="veil", description="veil: variational approximation in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit eight schools and German credit, compare with NUTS")
    demo.add_argument("--max-steps", type=int, default=20_000, help="cap on steps per fit")
    demo.add_argument("--out", default="veil_demo.png", help="PNG of traces and marginals ('' for none)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from veil.demo import run_demo

        run_demo(max_steps=args.max_steps, out=args.out or None, seed=args.seed,
                 progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
