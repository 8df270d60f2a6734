"""The analysis step of a study: every figure of its grid files analysed, and the paper's numbers beside ours.

    python analysis/study_report.py GRID.toml [GRID.toml ...] --out OUT_DIR
        [--transfer-source MODEL [--transfer-arch NAME]] [--max-images N] [--landscape-points N]
        [--landscape-images N] [--data DIR] [--device auto]
    python analysis/study_report.py script/grids --out OUT_DIR        # every grid file of a study folder

Each grid file is one figure or table of the paper, named by its file (script/grids/fig3.toml ->
OUT_DIR/fig3/). Its analysis is that of the existing tools, called on the grid's own runs (never a
glob of the shared run tree, where other figures' runs sit):

- fig3, fig4, fig5 (and any other grid): analysis/plot_curves.py's curves and double-win tables,
  with the grid's runs as the expected set;
- fig6 (Figs. 2, 6, A9): analysis/loss_landscape.py on every finished run, in the plane of its
  trajectory's principal directions (random filter-normalized directions for a run without one),
  laid out as the paper does in fig6.png (clean test images) and figA9.png (PGD images), and
  plot_curves.py's tables of the same runs (their SA, which the text quotes);
- fig7 (Figs. 7, A8): analysis/mask_stats.py on the grid's stage-1 directories, with a kernel heatmap
  of each one's ticket at the grid's highest round;
- table_a2 (Table A2): analysis/robustness.py with the transfer attack from --transfer-source.

A figure with nothing to analyse yet (no finished run, no source model, a grid whose inputs do not
exist yet) is skipped with one printed line. Then OUT_DIR/paper_vs_ours.md: one table per figure,
the published numbers (analysis/paper_numbers.toml) beside ours with their support
(analysis/paper_vs_ours.py); a figure not analysed yet shows its numbers as not measured.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/study_report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import loss_landscape, mask_stats, plot_curves, robustness  # noqa: E402
from analysis import paper_vs_ours as pvo  # noqa: E402
from study import grid as study_grid  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

CURVES, LANDSCAPE, MASKS, TRANSFER = "curves", "landscape", "masks", "transfer"
# grid file name -> the analysis it takes (its paper figure: paper_vs_ours.GRID_FIGURES); others: CURVES
ANALYSES = {"fig6": LANDSCAPE, "fig7": MASKS, "table_a2": TRANSFER}
ORDER = list(pvo.GRID_FIGURES)


@dataclass
class Figure:
    """One grid file of the study and what its analysis produced."""

    name: str  # the grid file's stem: the output folder
    grid_path: Path
    paper: object  # the paper_numbers.toml figure, or None for a grid of our own
    kind: str
    out: Path
    ours_from: str = ""  # one line: where our numbers come from, or why there are none yet
    analysed: bool = False


def grid_files(items):
    """The grid files named, a folder standing for its *.toml files (the paper's figures first, in order)."""
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.toml"), key=lambda f: (ORDER.index(f.stem) if f.stem in ORDER else len(ORDER),
                                                             f.name))
            if not found:
                raise UserError(f"'{p}' holds no grid file (*.toml); pass grid files or a folder of them, such as "
                                "script/grids.")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"'{p}' does not exist; pass grid files (script/grids/fig3.toml) or a folder of them.")
    seen, unique = set(), []
    for f in files:
        if f.stem in seen:
            raise UserError(f"two grid files are named '{f.stem}' ({f}); each figure's output folder is its grid "
                            "file's name, so pass one of them.")
        seen.add(f.stem)
        unique.append(f)
    return unique


def _finished(runs):
    return [r for r in runs if os.path.lexists(Path(r.run_dir) / "results.json")]


def _count(done, runs):
    return f"{len(done):,} of {_plural(len(runs), 'run')}"


def _plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def analyse_curves(fig, grid, runs):
    done = _finished(runs)
    if not done:
        return f"0 of {_plural(len(runs), 'run')} finished"
    expected = [study_grid.expected_record(r) for r in runs]
    rows, warnings, _ = plot_curves.analyse([str(r.run_dir) for r in done], fig.out, expected=expected,
                                            grid_base=grid.path.parent)
    fig.ours_from = (f"Ours: `{fig.name}/double_win.csv` ({_plural(len(rows), 'row')}) from {_count(done, runs)} of "
                     f"`{grid.path.name}`" + (f"; {len(warnings)} warning(s) in `{fig.name}/warnings.txt`"
                                              if warnings else "") + ".")
    return None


def _landscape_name(r, grid):
    """The run's directory below the grid's out, flattened: unique as run directories are."""
    return "_".join(Path(r.run_dir).relative_to(grid.out).parts)


def analyse_landscapes(fig, grid, runs, args):
    done = [r for r in _finished(runs) if (Path(r.run_dir) / "model_best.pt").is_file()]
    if not done:
        return f"0 of {_plural(len(runs), 'run')} finished"
    for r in done:
        pca = len(loss_landscape.trajectory_files(r.run_dir)) >= 3
        argv = [str(r.run_dir), "--out", str(fig.out / _landscape_name(r, grid)), "--device", args.device,
                "--directions", "pca" if pca else "random", "--grid", str(args.landscape_points),
                "--num-images", str(args.landscape_images)] + (["--data", args.data] if args.data else [])
        print(f"{fig.name}: landscape of {r.run_dir}", flush=True)
        loss_landscape.main(argv)
    montages = draw_montages(fig, grid, runs)
    # the SA the text quotes beside the landscapes: plot_curves.py's summary.csv of the same runs
    plot_curves.analyse([str(r.run_dir) for r in done], fig.out, figures=False,
                        expected=[study_grid.expected_record(r) for r in runs], grid_base=grid.path.parent)
    fig.ours_from = (f"Ours: {', '.join(f'`{fig.name}/{m.name}`' for m in montages)} (each run's landscape in "
                     f"`{fig.name}/*/landscape.png`) and `{fig.name}/summary.csv` from {_count(done, runs)} of "
                     f"`{grid.path.name}`.")
    return None


def draw_montages(fig, grid, runs):
    """The paper's layout of the landscapes: rows = data rates, columns = pre-trainings; fig6.png the
    loss on clean test images, figA9.png on PGD images; one pair per (dataset, regime, ticket family,
    level, seed) of the grid, suffixed when there are several. Returns the PNGs."""
    import json

    groups = {}
    for r in runs:
        family = Path(r.run_dir).parent.parent.name if r.round is not None else "dense"
        groups.setdefault((r.dataset, r.regime, family, r.sparsity, r.seed), {})[(r.data_rate, r.pretrain)] = r
    written = []
    for (dataset, regime, family, sparsity, seed), cells in groups.items():
        panels = []
        for rate in grid.data_rates:
            row = []
            for label in grid.pretrains:
                r = cells.get((rate, label))
                path = fig.out / _landscape_name(r, grid) / "landscape.json" if r else None
                land = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
                row.append((f"{pvo.PRETRAIN_NAMES.get(label, label)}, {100 * rate:g}% of the data", land))
            panels.append(row)
        what = (f"{pvo.DATASET_NAMES.get(dataset, dataset)}, {pvo.METHOD_NAMES.get(family, family)} at {sparsity:.2f}%, "
                f"{regime.upper()} fine-tuning, seed {seed}")
        suffix = "" if len(groups) == 1 else "_" + "_".join(map(str, (dataset, regime, family, f"s{sparsity:.2f}",
                                                                        f"seed{seed}")))
        for name, key, surface in (("fig6", "loss_clean", "clean test images"), ("figA9", "loss_pgd", "PGD test images")):
            written.append(loss_landscape.plot_panels(fig.out / f"{name}{suffix}.png", panels, key,
                                                      f"Loss on {surface} and training trajectories: {what}"))
    return written


def analyse_masks(fig, grid):
    dirs = [td for pre in grid.pretrains.values() for td in pre["tickets"]]
    if not dirs:
        return "the grid lists no ticket directory"
    heatmaps = []
    for td in dirs:
        last = max(td.levels) if grid.rounds == "all" else max(grid.rounds)
        heatmaps += ["--heatmap", str(td.path / "tickets" / f"round_{last:02d}.pt")]
    mask_stats.main([str(td.path) for td in dirs] + ["--out", str(fig.out)] + heatmaps)
    fig.ours_from = (f"Ours: `{fig.name}/mask_iou.csv`, `zero_kernels.csv` and `heatmap_*` from the "
                     f"{len(dirs)} stage-1 directories of `{grid.path.name}` (masks have no seeds).")
    return None


def analyse_transfer(fig, grid, runs, args):
    if args.transfer_source is None:
        return (f"no --transfer-source given (the unseen robust model; {grid.path.name}'s header says how to "
                "make one)")
    done = [r for r in _finished(runs) if (Path(r.run_dir) / "model_best.pt").is_file()]
    if not done:
        return f"0 of {_plural(len(runs), 'run')} finished"
    argv = ([str(r.run_dir) for r in done] + ["--out", str(fig.out), "--transfer-source", args.transfer_source,
                                              "--max-images", str(args.max_images), "--device", args.device]
            + (["--transfer-arch", args.transfer_arch] if args.transfer_arch else [])
            + (["--data", args.data] if args.data else []))
    robustness.main(argv)
    fig.ours_from = (f"Ours: `{fig.name}/robustness.csv` from {_count(done, runs)} of `{grid.path.name}`, attacked "
                     f"through `{args.transfer_source}`.")
    return None


def analyse(fig, args):
    """Run the figure's analysis into fig.out; returns None, or the reason it was skipped."""
    try:
        grid = study_grid.load_grid(fig.grid_path)
        runs = study_grid.expand(grid)
    except UserError as exc:  # its θ_p or tickets do not exist yet: nothing to analyse, said once
        return f"its grid cannot be read yet ({exc})"
    if fig.kind == MASKS:
        return analyse_masks(fig, grid)
    if fig.kind == LANDSCAPE:
        return analyse_landscapes(fig, grid, runs, args)
    if fig.kind == TRANSFER:
        return analyse_transfer(fig, grid, runs, args)
    return analyse_curves(fig, grid, runs)


def paper_sections(figs, figures):
    """[(paper figure, double_win table, outputs, ours_from)] of the figures the paper file knows."""
    sections = []
    for fig in figs:
        if fig.paper is None or fig.paper not in figures:
            continue
        table, outputs = {}, {}
        if fig.analysed:
            if (fig.out / "double_win.csv").is_file():
                table = pvo.read_double_win(fig.out)
            outputs = pvo.read_outputs(fig.out)
        sections.append((fig.paper, table, outputs, fig.ours_from))
    return sections


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grids", nargs="+", metavar="GRID_OR_FOLDER",
                   help="grid files of the study (script/grids/fig3.toml ...), or a folder of them")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="one folder per figure, and paper_vs_ours.md")
    p.add_argument("--paper", default=str(pvo.DEFAULT_PAPER), metavar="FILE",
                   help="the paper's numbers (default: analysis/paper_numbers.toml)")
    p.add_argument("--transfer-source", default=None, metavar="MODEL",
                   help="Table A2: the unseen robust model crafting the transfer attack (same classes as the runs)")
    p.add_argument("--transfer-arch", default=None, help="its architecture, when the file does not say")
    p.add_argument("--max-images", type=int, default=0,
                   help="Table A2: test images scored per run (default 0 = all)")
    p.add_argument("--landscape-points", type=int, default=21,
                   help="Figs. 2, 6, A9: grid points per axis of each landscape (default 21)")
    p.add_argument("--landscape-images", type=int, default=256,
                   help="Figs. 2, 6, A9: fixed test images of each landscape's loss (default 256)")
    p.add_argument("--data", default=None, help="dataset root for the landscapes and Table A2 (default: each run's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.landscape_points < 2 or args.landscape_images < 1:
        raise UserError("--landscape-points must be at least 2 and --landscape-images at least 1.")
    if args.max_images < 0:
        raise UserError(f"--max-images must be 0 (all) or a positive number, not {args.max_images}.")
    if args.transfer_source is not None and not Path(args.transfer_source).is_file():
        raise UserError(f"--transfer-source '{args.transfer_source}' does not exist; pass the robust model's "
                        "checkpoint (e.g. a run's model_best.pt).")
    return args


def main(argv=None):
    args = parse_args(argv)
    figures, numbers = pvo.load_paper(args.paper)
    out = Path(args.out)
    figs = []
    for path in grid_files(args.grids):
        figs.append(Figure(path.stem, path, pvo.GRID_FIGURES.get(path.stem), ANALYSES.get(path.stem, CURVES),
                           out / path.stem))
    for fig in figs:
        label = f"{fig.name} ({fig.paper})" if fig.paper else fig.name
        try:
            skipped = analyse(fig, args)
        except UserError as exc:
            raise UserError(f"{label}: {exc}") from None
        if skipped:
            fig.ours_from = f"Ours: not analysed yet: {skipped}."
            print(f"{label}: skipped, {skipped}")
        else:
            fig.analysed = True
            print(f"{label}: analysed into {fig.out}")
        if fig.paper is None:
            print(f"{label}: no figure of {args.paper} names it, so paper_vs_ours.md has no table for it")
    out.mkdir(parents=True, exist_ok=True)
    intro = [f"Ours: the analysis of {len(figs)} grid file(s) by `analysis/study_report.py`, one folder per figure "
             "beside this file."]
    text = pvo.render_study(figures, numbers, paper_sections(figs, figures), intro)
    atomic_write_text(text, out / "paper_vs_ours.md")
    print(f"wrote {out / 'paper_vs_ours.md'}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
