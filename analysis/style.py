"""How every figure of the analysis looks: colours, the double-win verdict markers, the sparsity axis.

Colours. Each (pre-training, method family) pair has its own colour, and a pair keeps it in every
figure and invocation: the pre-training sets the hue (std blue, fat green, at red), the family a
distinct colour within it (IMP, OMP, LMP, random pruning, the dense baseline a dark shade), so "at
imp" and "at rp" differ in colour, not only in line style. Labels outside the table get a palette
colour chosen from a hash of the label, turned per family in the same way.

Verdict markers (the curves of analysis/plot_curves.py): at each ticket level, in the line's colour,
a filled circle where the level is double-win, a cross where it is not, a hollow circle where the
verdict is uncertain (its support under seed resampling lies between analysis.verdict.CONTRADICTED
and SUPPORTED: other seeds could flip it) and a small dot where no verdict was given; each kind
drawn gets one legend entry.

Sparsity axis: levels evenly spaced in sparsity or in IMP rounds (a constant fraction of the
remaining weights pruned per level) sit one step apart, the paper's layout; any other set of levels
(channel tickets' weight sparsities, levels of several methods mixed) is drawn on a numeric axis in
percent, so distances between levels, and the slopes between them, are true.
"""

import colorsys
import math
import re
import zlib

from analysis import verdict

PRETRAIN_COLORS = {"std": "#1f77b4", "fat": "#2ca02c", "at": "#d62728"}
# other pre-training labels: hues the table below leaves free
_PRETRAIN_PALETTE = ("#9467bd", "#8c564b", "#393b79", "#637939", "#7b4173")
_PALETTE = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79")
# the methods figures (one pre-training, every method) colour by method alone; these avoid the
# pre-training hues, so a methods figure is never read as a pre-training
METHOD_COLORS = {"imp": "#9467bd", "imp-st": "#9467bd", "imp-at": "#e377c2", "omp": "#ff7f0e",
                 "rp": "#7f7f7f", "dense": "#000000"}
FAMILIES = ("imp", "omp", "lmp", "rp", "dense")
# (pre-training, family) -> colour; chosen by eye to stay apart on white and from each other
SERIES_COLORS = {
    ("std", "imp"): "#1f77b4", ("std", "omp"): "#17becf", ("std", "lmp"): "#6a51a3", ("std", "rp"): "#7b8fa6",
    ("std", "dense"): "#08306b",
    ("fat", "imp"): "#2ca02c", ("fat", "omp"): "#bcbd22", ("fat", "lmp"): "#1b9e77", ("fat", "rp"): "#8c9a62",
    ("fat", "dense"): "#00441b",
    ("at", "imp"): "#d62728", ("at", "omp"): "#ff7f0e", ("at", "lmp"): "#e377c2", ("at", "rp"): "#b07a6e",
    ("at", "dense"): "#67000d",
}
# for labels outside the table: (hue shift, saturation factor, lightness factor) per family
_FAMILY_TURN = {"imp": (0.0, 1.0, 1.0), "omp": (0.12, 1.0, 1.15), "lmp": (-0.12, 1.0, 0.95), "rp": (0.0, 0.3, 1.35),
                "dense": (0.0, 1.0, 0.5)}

WIN, LOSS, UNCERTAIN, UNJUDGED = "win", "loss", "uncertain", "unjudged"
VERDICT_KINDS = (WIN, LOSS, UNCERTAIN, UNJUDGED)
_VERDICT_LABELS = {
    WIN: "double-win",
    LOSS: "not double-win",
    UNCERTAIN: f"uncertain double-win (support {verdict.CONTRADICTED}–{verdict.SUPPORTED})",
    UNJUDGED: "no verdict (see warnings)",
}
EVEN_TOLERANCE = 0.05  # of the mean step: levels rounded to 0.01 points still count as evenly spaced


def palette_color(label):
    return _PALETTE[zlib.crc32(str(label).encode("utf-8")) % len(_PALETTE)]


def pretrain_color(label):
    if label in PRETRAIN_COLORS:
        return PRETRAIN_COLORS[label]
    return _PRETRAIN_PALETTE[zlib.crc32(str(label).encode("utf-8")) % len(_PRETRAIN_PALETTE)]


def method_color(label):
    return METHOD_COLORS.get(label) or palette_color(label)


def method_family(label):
    """'imp', 'omp', 'lmp', 'rp', 'dense' or the label's leading word ('imp-st', 'omp_channel' -> imp, omp)."""
    found = re.match(r"[A-Za-z]+", str(label))
    return found.group(0).lower() if found else str(label)


def series_color(pretrain, method):
    """The colour of a (pre-training, method) line: one per pre-training x method family."""
    family = method_family(method)
    known = SERIES_COLORS.get((pretrain, family))
    if known:
        return known
    turn = _FAMILY_TURN.get(family)
    if turn is None:  # a family of its own: a hue step chosen from its name
        turn = ((zlib.crc32(family.encode("utf-8")) % 5 + 1) * 0.045, 1.0, 0.9)
    return _turned(pretrain_color(pretrain), *turn)


def _turned(hex_color, hue_shift, sat_factor, light_factor):
    r, g, b = (int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    h, lum, s = colorsys.rgb_to_hls(r, g, b)
    rgb = colorsys.hls_to_rgb((h + hue_shift) % 1.0, min(0.8, lum * light_factor), min(1.0, s * sat_factor))
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


# --------------------------------------------------------------------------- verdict markers

def verdict_kind(win, support):
    """The marker kind of a level: the rule's verdict, 'uncertain' when its support is, 'unjudged' without one.

    This is double_win.md's reading: win / no, with '?' where the support is uncertain."""
    label = verdict.support_label(support)
    if label == "":
        return UNJUDGED
    if label == "uncertain":
        return UNCERTAIN
    if win is None:  # only the support is known: a settled support is the verdict
        return WIN if label == "supported" else LOSS
    return WIN if win else LOSS


def verdict_marker(kind, color):
    """matplotlib keyword arguments of the marker of ``kind`` in ``color``."""
    if kind == WIN:
        return {"marker": "o", "ms": 5.5, "mfc": color, "mec": color, "mew": 1.0}
    if kind == LOSS:
        return {"marker": "x", "ms": 5.5, "mfc": color, "mec": color, "mew": 1.6}
    if kind == UNCERTAIN:
        return {"marker": "o", "ms": 5.5, "mfc": "white", "mec": color, "mew": 1.4}
    return {"marker": "o", "ms": 2.5, "mfc": color, "mec": color, "mew": 0.5}


def verdict_legend_handles(kinds):
    """One neutral (dark grey) legend handle per verdict kind in ``kinds``, in VERDICT_KINDS order."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], ls="none", label=_VERDICT_LABELS[k], **verdict_marker(k, "#333333"))
            for k in VERDICT_KINDS if k in kinds]


# --------------------------------------------------------------------------- sparsity axis

def _even(steps):
    mean = sum(steps) / len(steps)
    return mean > 0 and all(abs(d - mean) <= EVEN_TOLERANCE * mean for d in steps)


def evenly_spaced(levels):
    """True when the sorted ``levels`` (percent) are evenly spaced in sparsity or in IMP rounds."""
    levels = sorted(levels)
    if len(levels) <= 2:
        return True
    if levels[-1] >= 100.0:
        return _even([b - a for a, b in zip(levels, levels[1:])])
    remaining = [math.log(100.0 - s) for s in levels]
    return (_even([b - a for a, b in zip(levels, levels[1:])])
            or _even([a - b for a, b in zip(remaining, remaining[1:])]))


def sparsity_positions(levels):
    """({level: x}, numeric): x is the level's rank for evenly spaced levels, the level itself otherwise."""
    levels = sorted(levels)
    if evenly_spaced(levels):
        return {s: i for i, s in enumerate(levels)}, False
    return {s: s for s in levels}, True


def sparsity_axis(ax, levels, numeric, fmt):
    """Ticks and limits of a sparsity axis (``fmt`` writes a level as its tick label)."""
    levels = sorted(levels)
    if not numeric:
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([fmt(s) for s in levels], rotation=60, fontsize=7)
        ax.set_xlim(-0.5, max(len(levels) - 0.5, 0.5))
        return
    from matplotlib.ticker import FixedLocator, MaxNLocator

    pad = 0.04 * (levels[-1] - levels[0])
    ax.set_xlim(levels[0] - pad, levels[-1] + pad)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_minor_locator(FixedLocator(levels))  # a short tick under every level drawn
    ax.tick_params(axis="x", which="major", labelsize=7)
    ax.tick_params(axis="x", which="minor", length=3, width=0.8)

