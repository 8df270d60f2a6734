"""The figures as a reader sees them (analysis/style.py), checked on the matplotlib objects drawn:
one colour per pre-training x method family, a distinct marker per double-win verdict with a legend
entry each, and a numeric sparsity axis where the levels are uneven."""

import itertools

import pytest
from matplotlib.colors import to_rgb

from analysis import common, plot_companion, plot_curves, style
from tests.test_analysis import DENSE, write_level

IMP = [20.0, 36.0, 48.8]  # one IMP round apart (20% of the remaining weights each)
CHANNEL = {"std": [38.15, 60.97, 74.33], "at": [38.95, 61.91, 76.21]}  # uneven once std and at share an axis
CLEAR_WIN = dict(st_sa=[95.0, 95.5, 96.0], at_sa=[85.0, 85.5, 86.0], at_ra=[53.0, 53.5, 54.0])
CLEAR_LOSS = dict(st_sa=[80.0, 80.5, 81.0], at_sa=[85.0, 85.5, 86.0], at_ra=[53.0, 53.5, 54.0])
# ST SA mean 91 clears the edge (90) but resampled seeds often fall below it: an uncertain win
EDGE_WIN = dict(st_sa=[86.0, 91.0, 96.0], at_sa=[85.0, 85.5, 86.0], at_ra=[53.0, 53.5, 54.0])


def _distance(a, b):
    return sum((x - y) ** 2 for x, y in zip(to_rgb(a), to_rgb(b))) ** 0.5


def test_every_pretraining_and_method_family_has_its_own_colour():
    families = ("imp", "omp", "lmp", "rp", "dense")
    colours = {(p, m): style.series_color(p, m) for p in ("std", "fat", "at") for m in families}
    for (a, ca), (b, cb) in itertools.combinations(colours.items(), 2):
        assert _distance(ca, cb) > 0.1, (a, ca, b, cb)
    for label in ("mine", "swav", "moco-v2"):  # a label outside the table: its families still apart
        turned = [style.series_color(label, m) for m in families]
        for ca, cb in itertools.combinations(turned, 2):
            assert _distance(ca, cb) > 0.1, (label, ca, cb)
    # a label keeps its family's colour: IMP by its re-training kind, OMP by its pattern
    assert style.series_color("at", "imp-st") == style.series_color("at", "imp") == colours[("at", "imp")]
    assert style.series_color("std", "omp_channel") == colours[("std", "omp")]
    assert style.series_color("mine", "rp") == style.series_color("mine", "rp")  # fixed across calls
    assert common.pretrain_color("at") == style.pretrain_color("at")  # the old name still answers


@pytest.mark.parametrize("win, support, kind", [
    (True, 0.95, style.WIN), (False, 0.02, style.LOSS), (True, 0.5, style.UNCERTAIN), (False, 0.5, style.UNCERTAIN),
    (True, None, style.UNJUDGED), (None, 0.95, style.WIN), (None, 0.05, style.LOSS),
])
def test_verdict_kind_reads_like_the_table(win, support, kind):
    assert style.verdict_kind(win, support) == kind


@pytest.mark.parametrize("levels, even", [
    ([40.0, 64.0, 78.4, 87.04], True),     # IMP rounds of 40%
    ([10.0, 20.0, 30.0, 40.0], True),      # evenly spaced in sparsity
    ([20.0, 36.0, 59.04], False),          # an IMP round missing
    ([38.15, 38.95, 40.0, 60.97, 61.91, 64.0, 74.33], False),
    ([50.0, 90.0], True),
])
def test_evenly_spaced_levels(levels, even):
    assert style.evenly_spaced(levels) is even


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """{figure name: matplotlib Figure} of plot_curves on a tree with every verdict kind and both axes."""
    root = tmp_path_factory.mktemp("runs")
    for pre in ("at", "std"):
        write_level(root, sparsity=0.0, pretrain=pre, **DENSE)
        for s, values in zip(IMP, (CLEAR_WIN, EDGE_WIN, CLEAR_LOSS)):
            write_level(root, sparsity=s, pretrain=pre, **values)
        for s, values in zip(CHANNEL[pre], (CLEAR_WIN, CLEAR_LOSS, CLEAR_LOSS)):
            write_level(root, sparsity=s, pretrain=pre, method="omp_channel", **values)
    for s in IMP:
        write_level(root, sparsity=s, pretrain="at", method="rp", **CLEAR_LOSS)
    drawn = {}

    def keep(fig, path):  # the figure object, not its pixels, is what these tests read
        drawn[path.stem] = fig
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "save_figure", keep)
        plot_curves.analyse([root], tmp_path_factory.mktemp("out"))
    return drawn


def _lines(fig, label):
    return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label]


def test_curve_colours_differ_per_family(figures):
    fig = figures["curves_cifar10_rate100_imp"]
    colours = {label: to_rgb(_lines(fig, label)[0].get_color()) for label in ("at imp", "at rp", "at dense",
                                                                               "std imp", "std dense")}
    assert len(set(colours.values())) == len(colours), colours
    assert colours["at imp"] == to_rgb(style.series_color("at", "imp"))


def test_verdict_markers_are_distinct_and_each_has_a_legend_entry(figures):
    fig = figures["curves_cifar10_rate100_imp"]
    (legend,) = fig.legends
    entries = {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    win, loss = entries["double-win"], entries["not double-win"]
    uncertain = entries["uncertain double-win (support 0.1–0.9)"]
    assert (win.get_marker(), loss.get_marker(), uncertain.get_marker()) == ("o", "x", "o")
    assert to_rgb(uncertain.get_markerfacecolor()) == (1.0, 1.0, 1.0) != to_rgb(win.get_markerfacecolor())
    # in every panel, the at imp line's levels carry win, uncertain, loss markers in its colour
    colour = to_rgb(style.series_color("at", "imp"))
    for ax in fig.axes:
        marks = {(ln.get_marker(), to_rgb(ln.get_markerfacecolor())): list(ln.get_xdata()) for ln in ax.get_lines()
                 if ln.get_linestyle() == "None" and to_rgb(ln.get_markeredgecolor()) == colour}
        assert marks == {("o", colour): [0], ("o", (1.0, 1.0, 1.0)): [1], ("x", colour): [2]}, marks


def test_uneven_levels_get_a_numeric_axis_and_even_ones_keep_their_steps(figures):
    channel = figures["curves_cifar10_rate100_omp_channel"]
    ax = channel.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "at omp_channel"]
    assert list(line.get_xdata()) == CHANNEL["at"]  # drawn at its sparsity, not at its rank
    lo, hi = ax.get_xlim()
    assert lo < 38.15 and 76.21 < hi < 80
    assert all(t.get_text() == "" or float(t.get_text()) % 5 == 0 for t in ax.get_xticklabels())
    imp = figures["curves_cifar10_rate100_imp"].axes[0]
    (line,) = [ln for ln in imp.get_lines() if ln.get_label() == "at imp"]
    assert list(line.get_xdata()) == [0, 1, 2]
    assert [t.get_text() for t in imp.get_xticklabels()] == ["20.00", "36.00", "48.80"]


def test_companion_colours_differ_per_method_family():
    # a series key ends with the architecture (a line never mixes two)
    keys = [("cifar10", 1.0, pre, "unstructured", "", label, "theta_p", "resnet18") for pre in ("at", "std")
            for label in ("imp", "omp", "rp")]
    keys += [("cifar10", 1.0, pre, "", "", "dense", "", "resnet18") for pre in ("at", "std")]
    colours = {k: plot_companion.make_series({k: {}}, k, "method").color for k in keys}
    assert len(set(colours.values())) == len(keys), colours
