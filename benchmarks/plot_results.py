"""Draw the headline ratios of benchmarks/RESULTS.md (balefs against its peer).

The figures come from ``benchmarks/results.json``, the same figures RESULTS.md reports,
so the plot and the report cannot disagree. The script writes ``benchmarks/results.png``
(one panel per benchmark, one bar per pass, log scale; the dashed line is parity with the
peer and the black tick the bar the issue sets) and can print RESULTS.md's summary table.

matplotlib is needed only for the plot (``pip install matplotlib``); it is not a
dependency of balefs. ``--summary`` and ``--check`` need nothing beyond the standard
library.

    python benchmarks/plot_results.py                  # writes benchmarks/results.png
    python benchmarks/plot_results.py --summary        # prints the summary table
    python benchmarks/plot_results.py --check          # RESULTS.md holds that table as printed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLOURS = {"PASS": "#2e7d32", "MISS": "#c62828", None: "#78909c"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, no usage block
        sys.exit(f"plot_results.py: {message} (see --help)")


def load(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["benchmarks"]
    except FileNotFoundError:
        sys.exit(f"plot_results.py: no such file: {path}")
    except (ValueError, KeyError) as exc:
        sys.exit(f"plot_results.py: {path} is not a results file: {exc}")


def summary(benchmarks: list[dict]) -> str:
    rows = [
        "| benchmark | peer | headline (balefs vs peer) | bars | commit |",
        "|---|---|---|---|---|",
    ]
    for b in benchmarks:
        rows.append(
            f"| [{b['title']}](#{b['anchor']}) | {b['peer']} | {b['headline']} "
            f"| {b['bars']} | {b['commit']} |"
        )
    return "\n".join(rows)


def plot(benchmarks: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        sys.exit("plot_results.py: matplotlib is missing: pip install matplotlib")

    heights = [len(b["passes"]) + 1.2 for b in benchmarks]
    fig, axes = plt.subplots(
        len(benchmarks), 1, figsize=(9, 0.42 * sum(heights) + 1.2),
        gridspec_kw={"height_ratios": heights},
    )
    for ax, b in zip(axes, benchmarks):
        passes = b["passes"]
        ys = range(len(passes))
        ratios = [p["ratio"] for p in passes]
        ax.barh(ys, ratios, color=[COLOURS[p["verdict"]] for p in passes], height=0.7)
        for y, p in zip(ys, passes):
            right = max(p["ratio"], p["bar"] or 0)
            ax.text(right * 1.08, y, f"{p['ratio']:g}x", va="center", fontsize=8)
            if p["bar"] is not None:
                ax.plot([p["bar"], p["bar"]], [y - 0.42, y + 0.42], color="black", lw=2)
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(0.05, 40)
        ax.set_yticks(list(ys), [p["label"] for p in passes], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{b['title']} — at {b['commit']}", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    axes[-1].set_xlabel("balefs / peer (log scale; higher is better for balefs)", fontsize=9)
    fig.legend(
        handles=[
            Patch(color=COLOURS["PASS"], label="bar passed"),
            Patch(color=COLOURS["MISS"], label="bar missed"),
            Patch(color=COLOURS[None], label="no bar"),
        ],
        loc="upper right", fontsize=8, ncol=3,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / "results.json",
                    help="results file (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=HERE / "results.png",
                    help="image to write (default: %(default)s)")
    ap.add_argument("--summary", action="store_true",
                    help="print RESULTS.md's summary table (Markdown) instead of plotting")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless RESULTS.md (beside --data) holds the summary table as printed")
    args = ap.parse_args(argv)
    benchmarks = load(args.data)
    if args.summary:
        print(summary(benchmarks))
        return 0
    if args.check:
        report = args.data.with_name("RESULTS.md")
        if summary(benchmarks) not in report.read_text():
            print(f"plot_results.py: {report} does not hold the summary table of {args.data}")
            return 1
        print(f"{report} agrees with {args.data}")
        return 0
    plot(benchmarks, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
