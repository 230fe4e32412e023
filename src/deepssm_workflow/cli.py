"""Command line of the workflow's steps: `deepssm-wf <step> ...`.

Each Snakemake rule calls one subcommand; the same commands work by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _synthesize(args) -> None:
    from .synthetic.cohort import SyntheticSettings, generate_cohort

    settings = SyntheticSettings.from_config(json.loads(args.settings))
    start = time.perf_counter()
    subjects = generate_cohort(args.anatomy, settings, args.out_dir, prefix=args.prefix, workers=args.workers)
    print(f"generated {len(subjects)} {args.anatomy} subjects in {time.perf_counter() - start:.1f}s")


def _qc_cohort(args) -> None:
    from .qc import cohort_figure

    cohort_figure(args.subjects, args.out, count=args.count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepssm-wf", description=__doc__)
    steps = parser.add_subparsers(dest="step", required=True)

    p = steps.add_parser("synthesize", help="generate a synthetic cohort")
    p.add_argument("--anatomy", required=True, choices=["femur", "metopic", "left_atrium"])
    p.add_argument("--settings", required=True, help="JSON of the config's `synthetic` block")
    p.add_argument("--out-dir", required=True, help="cohort folder (subjects.csv, ground_truth.csv, data/)")
    p.add_argument("--prefix", help="subject id prefix (default: the anatomy)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(run=_synthesize)

    p = steps.add_parser("qc-cohort", help="QC figure of a cohort: slices, outlines, points, meshes")
    p.add_argument("--subjects", required=True, help="subjects table (CSV manifest)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--count", type=int, default=4, help="subjects to show")
    p.set_defaults(run=_qc_cohort)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"deepssm-wf {args.step}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
