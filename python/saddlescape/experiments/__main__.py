"""The command line: ``python -m saddlescape.experiments NAME|all --out DIR [--quick] [--seeds N]``."""

from __future__ import annotations

import argparse
import sys
import time

from saddlescape.experiments import EXPERIMENTS, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m saddlescape.experiments",
        description="Reproduce the paper's figures and claims; each writes NAME.png, NAME.csv "
                    "and summary.txt into OUT/NAME/.",
        epilog="experiments:\n" + "\n".join(f"  {k:<15} {v[1]}" for k, v in EXPERIMENTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment, or all")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a small instance (seconds)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds, where averaged over")
    parser.add_argument("--data", default=None,
                        help="beta-schedule: an MNIST folder with the IDX files (default: "
                             "scikit-learn's bundled digits)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        start = time.perf_counter()
        try:
            summary = run(name, args.out, quick=args.quick, seeds=args.seeds,
                          data=args.data if name == "beta-schedule" else None,
                          progress=not args.no_progress)
        except ImportError as e:
            if args.name == "all":
                # `all` runs what this installation can: an optional dependency missing for
                # one experiment (torch for train) skips it with a line saying so.
                print(f"== {name} skipped: {e}")
                continue
            print(f"error in {name}: {e}", file=sys.stderr)
            return 2
        except (ValueError, OSError, ArithmeticError) as e:
            # A bad argument, an unwritable folder or a run that diverged: one line naming the experiment, not a traceback.
            print(f"error in {name}: {e}", file=sys.stderr)
            return 2
        print(f"== {name} ({time.perf_counter() - start:.1f} s) -> {args.out}/{name}/")
        for k, v in summary.items():
            print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
