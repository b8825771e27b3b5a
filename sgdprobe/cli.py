"""Command line: ``sgdprobe demo`` and ``sgdprobe plugins``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from sgdprobe.demo import run_demo

    plugins = args.plugins.split(",") if args.plugins else None
    every: int | str = args.every if args.every == "auto" else int(args.every)
    print(
        f"sgdprobe demo: full-batch GD on a tanh MLP on scikit-learn digits ({args.examples} examples), "
        f"lr={args.lr} (2/lr = {2 / args.lr:.3f}), {args.steps} steps, measuring every {every} step(s)"
    )
    result = run_demo(
        steps=args.steps,
        lr=args.lr,
        width=args.width,
        examples=args.examples,
        every=every,
        logdir=args.logdir,
        plugins=plugins,
    )
    print()
    print(result.summary())
    print(
        f"\nTensorBoard logs written to {result.probe.logdir}\n"
        f"  view them with: tensorboard --logdir {args.logdir}"
    )
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from sgdprobe import DEFAULT_PLUGINS, available_plugins

    for name, ep in sorted(available_plugins().items()):
        mark = " (default)" if name in DEFAULT_PLUGINS else ""
        print(f"{name:24s} {ep.value}{mark}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sgdprobe", description="Training-stability probe for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="full-batch GD on digits: watch sharpness reach 2/lr (edge of stability)"
    )
    demo.add_argument("--steps", type=int, default=1000)
    demo.add_argument("--lr", type=float, default=0.2)
    demo.add_argument("--width", type=int, default=128)
    demo.add_argument("--examples", type=int, default=1000)
    demo.add_argument("--every", default="10", help="measure every N steps, or 'auto' (5%% time budget)")
    demo.add_argument("--logdir", default="runs/sgdprobe-demo")
    demo.add_argument("--plugins", default="", help="comma-separated plugin names (default: sharpness)")
    demo.set_defaults(func=_demo)
    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.set_defaults(func=_plugins)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
