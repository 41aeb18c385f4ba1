"""The report of a study: report.md with tables, and PNG figures, from every run's results.

    python -m hvcodistill.report runs/studies/paper_miniature [--baseline NAME] [--out DIR]

Reads `<study dir>/study.json` (written by hvcodistill.sweep: the variants, seeds, baseline and
comparisons) and each run's summary.json and metrics.jsonl; without study.json it takes every
`<variant>/seed_<s>/` it finds. A partial study (runs missing, failed or still running) gives a
report of the finished runs that lists what is missing. Exit codes: 0 report written (also for a
partial study); 2 no such study directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hvcodistill.errors import EXIT_BAD_INPUT
from hvcodistill.studies.markdown import write_markdown
from hvcodistill.studies.results import load_study_dir

PROG = "hvcodistill.report"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "study_dir", help="the study directory (the sweep's --dir, default runs/studies/<name>)"
    )
    p.add_argument("--baseline", help="the variant to pair against (default: the study's baseline)")
    p.add_argument("--out", help="where report.md and the PNGs go (default: the study directory)")
    return p.parse_args(argv)


def error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv=None) -> int:
    args = parse_args(argv)
    study_dir = Path(args.study_dir)
    if not study_dir.is_dir():
        return error(f"study directory {study_dir} not found")
    study = load_study_dir(study_dir.resolve(), args.baseline)
    if not study.variants:
        return error(f"{study_dir} holds no study.json and no <variant>/seed_<s>/ runs")
    if study.baseline and study.variant(study.baseline) is None:
        variants = ", ".join(v.name for v in study.variants)
        return error(f"baseline {study.baseline!r} is not a variant of this study ({variants})")
    out = Path(args.out) if args.out else study_dir
    out.mkdir(parents=True, exist_ok=True)
    # matplotlib is imported only when figures are drawn, not for --help or bad input
    from hvcodistill.studies.figures import draw_all

    figures = draw_all(study, out)
    path = write_markdown(study, figures, out)
    done = sum(r.status == "done" for r in study.runs)
    drawn = "".join(f", {f.name}" for f, _ in figures.values())
    print(f"{PROG}: {done} of {len(study.runs)} runs finished; wrote {path}{drawn}")
    for v in study.variants:
        s, e = v.stat("model_acc"), v.stat("ensemble_acc")
        if s.n:
            print(
                f"  {v.name:<28} model {s.mean * 100:6.2f}%  ensemble {e.mean * 100:6.2f}%  "
                f"({s.n} seeds)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
