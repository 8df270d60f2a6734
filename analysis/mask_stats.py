"""Mask similarity and structure of tickets: IoU across pre-trainings, zero kernels, per-layer
sparsity, and the kernel heatmap of one ticket.

    python analysis/mask_stats.py TICKET_DIRS_OR_FILES... --out OUT_DIR [--heatmap TICKET ...]

A directory stands for the tickets in its ``tickets/`` folder (a stage-1 --save-dir), else for
the ``tickets/*.pt`` found below it, else for the ``*.pt`` files in it.  Tickets are grouped by
IMP round (by sparsity when a ticket has no round); a ticket's label is its "pretrain" field, or
the name of its stage-1 directory when the field is unknown (with the directory name appended
when two directories share a label).  IoU is |m_i ∩ m_j| / |m_i ∪ m_j| over kept weights,
computed for every pair of labels at each level.  A kernel is one [kh, kw] slice of a conv
weight (a single weight for 1x1 convs); it counts as zero when all its weights are pruned.

Outputs in OUT_DIR: mask_iou.csv/.png, zero_kernels.csv/.png, layer_sparsity.csv and, with
--heatmap (repeatable), heatmap_<name>.png/.json/.csv per ticket (one row per layer, one pixel per
kernel, bright = fully pruned as in the paper's Fig. 7; when the widest layer has more kernels than
--heatmap-width, a pixel is the fraction of zero kernels among consecutive kernels, and the x axis
still counts kernels).  Tickets of different architectures exit with status 2.
"""

import itertools
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/mask_stats.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pruning_utils as pu  # noqa: E402
from analysis import common  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

IOU_FIELDS = ["round", "sparsity_a", "sparsity_b", "label_a", "label_b", "iou", "ticket_a", "ticket_b"]
ZERO_FIELDS = ["label", "round", "sparsity", "zero_kernels", "kernels", "zero_kernel_percent", "ticket"]
LAYER_FIELDS = ["label", "round", "ticket_sparsity", "layer", "params", "kept", "sparsity", "zero_kernels", "kernels"]
HEATMAP_FIELDS = ["layer", "stage", "shape", "kernels", "zero_kernels", "zero_kernel_percent"]
_UNKNOWN = (None, "", "unknown")
KEPT_COLOR, PRUNED_COLOR = "#1f2a5a", "#ffd23f"  # the heatmap's 0 (a kernel with a weight left) and 1


@dataclass
class TicketInfo:
    path: Path
    label: str
    source: str  # the directory that names it
    round: object
    sparsity: float
    arch: object
    signature: tuple  # ((name, shape), ...) of its masks


def _source_dir(path):
    parent = path.parent
    return parent.parent if parent.name == "tickets" else parent


def heatmap_stem(path):
    """File-name part of a ticket's heatmap outputs: '<directory>_<file stem>', the directory's parent
    too for a replicated ticket search (SAVE_DIR/rI, docs/sweeps.md §6): 'at_imp_r1_round_03'."""
    path = Path(path)
    source = _source_dir(path)
    name = f"{source.parent.name}_{source.name}" if re.fullmatch(r"r\d+", source.name) else source.name
    return common.safe_name(f"{name}_{path.stem}")


def collect_files(inputs):
    """(ticket files, explicitly named files); UserError for a missing input or no tickets at all."""
    files, explicit = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
            explicit.add(p.resolve())
        elif p.is_dir():
            found = sorted((p / "tickets").glob("*.pt")) if (p / "tickets").is_dir() else []
            found = found or sorted(p.rglob("tickets/*.pt")) or sorted(p.glob("*.pt"))
            if not found:
                raise UserError(f"no ticket files (*.pt) in '{p}'; pass a stage-1 --save-dir or ticket files.")
            files.extend(found)
        else:
            raise UserError(f"'{p}' does not exist; pass ticket files or stage-1 --save-dir folders.")
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique, explicit


def _signature(masks):
    return tuple((name, tuple(m.shape)) for name, m in masks.items())


def kernel_flags(mask):
    """Bool vector over the [out, in] kernels of a conv mask: True where the kernel is fully pruned."""
    return ~mask.reshape(mask.shape[0] * mask.shape[1], -1).any(dim=1)


def scan(files, explicit):
    """First pass: per-ticket statistics (masks are not kept). Returns (infos, zero rows, layer rows, warnings)."""
    infos, zero_rows, layer_rows, warnings = [], [], [], []
    for path in files:
        try:
            ticket = pu.load_ticket(path)
        except UserError as exc:
            if path.resolve() in explicit:
                raise
            warnings.append(f"skipped '{path}': {exc}")
            continue
        masks = ticket["masks"]
        label = ticket.get("pretrain")
        label = _source_dir(path).name if label in _UNKNOWN else str(label)
        info = TicketInfo(path, label, str(_source_dir(path)), ticket.get("round"), float(pu.sparsity(masks)),
                          ticket.get("arch"), _signature(masks))
        infos.append(info)
        zk = pu.zero_kernels(masks)
        ls = pu.layer_sparsity(masks)
        zero, total = sum(v[0] for v in zk.values()), sum(v[1] for v in zk.values())
        zero_rows.append({"ticket": str(path), "zero_kernels": zero, "kernels": total,
                          "zero_kernel_percent": round(100.0 * zero / total, 4) if total else "", "_info": info})
        for name, m in masks.items():
            z, k = zk.get(name, ("", ""))
            layer_rows.append({"layer": name, "params": m.numel(), "kept": int(m.sum()), "sparsity": round(ls[name], 4),
                               "zero_kernels": z, "kernels": k, "_info": info})
    if not infos:
        raise UserError("none of the given files is a readable ticket; pass ticket files written by "
                        "main_imp_pretrain.py (tickets/round_XX.pt).")
    return infos, zero_rows, layer_rows, warnings


def check_same_architecture(infos):
    archs = sorted({i.arch for i in infos if i.arch not in _UNKNOWN})
    if len(archs) > 1:
        raise UserError(f"the tickets come from different architectures ({', '.join(archs)}); compare tickets of one "
                        "architecture at a time.")
    first = infos[0]
    for info in infos[1:]:
        if info.signature != first.signature:
            raise UserError(f"tickets '{first.path}' and '{info.path}' have different layers or shapes, so they are "
                            "of different architectures; compare tickets of one architecture at a time.")


def assign_labels(infos):
    sources = defaultdict(set)
    for i in infos:
        sources[i.label].add(i.source)
    for i in infos:
        if len(sources[i.label]) > 1:
            i.label = f"{i.label}/{Path(i.source).name}"


def assign_levels(infos):
    """Level = IMP round when every ticket has one and no label has two tickets of one round (seed
    files that sit at no 20% level all read as round 0), else the sparsity (2 decimals).

    Tickets of one round are at one sparsity only when their stage-1 runs used the same --rate;
    where they are not, the pairing is said out loud (IoU between masks of different density
    mostly measures the density)."""
    by_round = (all(isinstance(i.round, int) for i in infos)
                and len({(i.label, i.round) for i in infos}) == len(infos))
    if by_round:
        per_round = defaultdict(set)
        for i in infos:
            per_round[i.round].add(round(i.sparsity, 2))
        for k, levels in sorted(per_round.items()):
            if max(levels) - min(levels) > 0.5:
                print(f"warning: the tickets of round {k} differ in sparsity ({', '.join(f'{v:.2f}' for v in sorted(levels))}%),"
                      " so their IoU compares masks of different density; were they found with different --rate?",
                      file=sys.stderr)
    for i in infos:
        i.round = i.round if by_round else round(i.sparsity, 2)
    seen = {}
    for i in infos:
        key = (i.label, i.round)
        if key in seen:
            raise UserError(f"two tickets with label '{i.label}' at level {i.round}: '{seen[key]}' and '{i.path}'; "
                            "pass one stage-1 directory per pre-training.")
        seen[key] = i.path
    return by_round


def pairwise_iou(infos):
    """Second pass: IoU for every pair of labels at each level, loading one level's masks at a time."""
    rows = []
    levels = defaultdict(list)
    for i in infos:
        levels[i.round].append(i)
    for level in sorted(levels):
        group = sorted(levels[level], key=lambda i: common.order_key(i.label, common.PRETRAIN_ORDER))
        if len(group) < 2:
            continue
        masks = {i.path: pu.load_ticket(i.path)["masks"] for i in group}
        for a, b in itertools.combinations(group, 2):
            rows.append({"round": level, "sparsity_a": round(a.sparsity, 2), "sparsity_b": round(b.sparsity, 2),
                         "label_a": a.label, "label_b": b.label, "iou": round(pu.mask_iou(masks[a.path], masks[b.path]), 6),
                         "ticket_a": str(a.path), "ticket_b": str(b.path)})
    return rows


# --------------------------------------------------------------------------- figures

def _level_axis(ax, levels, sparsity_of):
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{sparsity_of.get(lv, float('nan')):.2f}" for lv in levels], rotation=60, fontsize=7)
    ax.set_xlabel("sparsity (%)")
    ax.grid(True, alpha=0.3)


def plot_iou(rows, out_dir, sparsity_of):
    plt = common.use_agg()
    levels = sorted({r["round"] for r in rows})
    pos = {lv: k for k, lv in enumerate(levels)}
    fig, ax = plt.subplots(figsize=(7, 4))
    pairs = defaultdict(list)
    for r in rows:
        pairs[(r["label_a"], r["label_b"])].append((pos[r["round"]], r["iou"]))
    for (a, b), pts in pairs.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=f"{a} vs {b}")
    _level_axis(ax, levels, sparsity_of)
    ax.set_ylabel("mask IoU")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Mask similarity across pre-trainings")
    return common.save_figure(fig, out_dir / "mask_iou.png")


def plot_zero_kernels(rows, out_dir, sparsity_of):
    plt = common.use_agg()
    levels = sorted({r["round"] for r in rows})
    pos = {lv: k for k, lv in enumerate(levels)}
    fig, ax = plt.subplots(figsize=(7, 4))
    by_label = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append((pos[r["round"]], r["zero_kernel_percent"]))
    for label in sorted(by_label, key=lambda x: common.order_key(x, common.PRETRAIN_ORDER)):
        pts = sorted(by_label[label])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=label,
                color=common.pretrain_color(label.split("/")[0]))
    _level_axis(ax, levels, sparsity_of)
    ax.set_ylabel("fully pruned kernels (%)")
    ax.legend(fontsize=8)
    ax.set_title("Zero kernels per sparsity level")
    return common.save_figure(fig, out_dir / "zero_kernels.png")


def _stage(name):
    head = name.split(".")[0]
    return head if head.startswith("layer") else "stem"


def heatmap(ticket_path, out_dir, max_width):
    """Kernel heatmap of one ticket: PNG, JSON (exact per-kernel flags) and CSV (per layer). Returns the PNG."""
    import numpy as np

    ticket = pu.load_ticket(ticket_path)
    layers = []
    for name, m in ticket["masks"].items():
        if m.dim() != 4:
            continue
        flags = kernel_flags(m).numpy()
        layers.append({"name": name, "stage": _stage(name), "shape": list(m.shape), "kernels": int(flags.size),
                       "zero_kernels": int(flags.sum()), "flags": flags})
    if not layers:
        raise UserError(f"ticket '{ticket_path}' has no convolution masks to draw; pass a ticket of a conv network.")
    widest = max(layer["kernels"] for layer in layers)
    per_pixel = max(1, math.ceil(widest / max_width))
    width = math.ceil(widest / per_pixel)
    grid = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        flags = layer["flags"].astype(float)
        pixels = math.ceil(flags.size / per_pixel)
        padded = np.full(pixels * per_pixel, np.nan)
        padded[:flags.size] = flags
        grid[row, :pixels] = np.nanmean(padded.reshape(pixels, per_pixel), axis=1)

    stem = heatmap_stem(ticket_path)
    plt = common.use_agg()
    import matplotlib.colors as mcolors

    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.2 * len(layers) + 1.6)))
    # as the paper's Fig. 7: bright = fully pruned, dark = kept; 0 must never read as the white of the
    # figure, which also marks the pixels past the end of a narrower layer (no kernel there)
    cmap = mcolors.LinearSegmentedColormap.from_list("kept_pruned", [KEPT_COLOR, PRUNED_COLOR]).with_extremes(bad="white")
    # x in kernels: pixel i covers kernels [i * per_pixel, (i + 1) * per_pixel), so the ticks count kernels
    extent = (0, width * per_pixel, len(layers) - 0.5, -0.5)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
                      extent=extent)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([layer["name"].removesuffix(".weight") for layer in layers],
                       fontsize=max(4, min(8, 400 // max(len(layers), 1))))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.set_xlabel("kernel index" + (f" (each pixel: {per_pixel} kernels)" if per_pixel > 1 else ""))
    starts = [i for i in range(len(layers)) if i == 0 or layers[i]["stage"] != layers[i - 1]["stage"]]
    for k, start in enumerate(starts):
        if start:
            ax.axhline(start - 0.5, color="#d62728", lw=1.2)
        end = starts[k + 1] if k + 1 < len(starts) else len(layers)
        ax.text(1.01, 1 - (start + end) / 2 / len(layers), layers[start]["stage"], transform=ax.transAxes,
                va="center", ha="left", fontsize=9, color="#d62728")
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.08)
    bar.set_label("fully pruned kernels" + (" (fraction per pixel)" if per_pixel > 1 else " (1 = pruned)"))
    ax.set_title(f"Kernels of {ticket_path.name} ({ticket.get('pretrain')}, {float(ticket['sparsity']):.2f}% sparse): "
                 "bright = fully pruned, dark = kept", fontsize=10)
    png = common.save_figure(fig, out_dir / f"heatmap_{stem}.png")

    atomic_write_text(json.dumps({
        "ticket": str(ticket_path), "pretrain": ticket.get("pretrain"), "round": ticket.get("round"),
        "sparsity": float(ticket["sparsity"]), "arch": ticket.get("arch"), "kernels_per_pixel": per_pixel,
        "layers": [{"name": layer["name"], "stage": layer["stage"], "shape": layer["shape"],
                    "kernels": layer["kernels"], "zero_kernels": layer["zero_kernels"],
                    "pruned": "".join("1" if f else "0" for f in layer["flags"])} for layer in layers]}),
        out_dir / f"heatmap_{stem}.json")
    common.write_csv([{"layer": layer["name"], "stage": layer["stage"], "shape": "x".join(map(str, layer["shape"])),
                       "kernels": layer["kernels"], "zero_kernels": layer["zero_kernels"],
                       "zero_kernel_percent": round(100.0 * layer["zero_kernels"] / layer["kernels"], 4)}
                      for layer in layers], out_dir / f"heatmap_{stem}.csv", HEATMAP_FIELDS)
    return png


# --------------------------------------------------------------------------- entry point

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tickets", nargs="+", metavar="TICKET_DIR_OR_FILE")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument("--heatmap", action="append", default=None, metavar="TICKET",
                   help="ticket file whose kernels to draw (repeatable: one heatmap per ticket; default: none)")
    p.add_argument("--heatmap-width", type=int, default=2048,
                   help="most pixels per heatmap row; wider layers are binned (default 2048)")
    args = p.parse_args(argv)
    if args.heatmap_width < 1:
        raise UserError(f"--heatmap-width must be at least 1, not {args.heatmap_width}.")
    return args


def _labelled(rows, sparsity_key):
    """Rows with the ticket's final label, level and sparsity (under ``sparsity_key``) filled in."""
    out = []
    for r in rows:
        info = r["_info"]
        row = {k: v for k, v in r.items() if k != "_info"}
        row.update({"label": info.label, "round": info.round, sparsity_key: round(info.sparsity, 2)})
        out.append(row)
    return out


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    files, explicit = collect_files(args.tickets)
    for ticket in args.heatmap or ():
        if not Path(ticket).is_file():
            raise UserError(f"--heatmap ticket '{ticket}' does not exist; pass a ticket file.")
    infos, zero_rows, layer_rows, warnings = scan(files, explicit)
    check_same_architecture(infos)
    assign_labels(infos)
    by_round = assign_levels(infos)
    iou_rows = pairwise_iou(infos)
    zero_rows = sorted(_labelled(zero_rows, "sparsity"), key=lambda r: (common.order_key(r["label"], common.PRETRAIN_ORDER), r["round"]))
    layer_rows = _labelled(layer_rows, "ticket_sparsity")
    out.mkdir(parents=True, exist_ok=True)
    written = [common.write_csv(iou_rows, out / "mask_iou.csv", IOU_FIELDS),
               common.write_csv(zero_rows, out / "zero_kernels.csv", ZERO_FIELDS),
               common.write_csv(layer_rows, out / "layer_sparsity.csv", LAYER_FIELDS)]
    sparsity_of = {}
    for i in infos:
        sparsity_of.setdefault(i.round, i.sparsity)
    if iou_rows:
        written.append(plot_iou(iou_rows, out, sparsity_of))
    else:
        warnings.append("no level has tickets of two pre-trainings, so no IoU was computed; pass tickets of "
                        "several pre-trainings.")
    written.append(plot_zero_kernels(zero_rows, out, sparsity_of))
    for ticket in args.heatmap or ():
        path = Path(ticket)
        other = pu.load_ticket(path)
        if _signature(other["masks"]) != infos[0].signature:
            raise UserError(f"--heatmap ticket '{path}' has different layers from the other tickets; pass a ticket of "
                            "the same architecture.")
        written.append(heatmap(path, out, args.heatmap_width))

    print(f"{len(infos)} tickets, {len({i.label for i in infos})} labels, levels by "
          f"{'IMP round' if by_round else 'sparsity'}")
    for r in iou_rows:
        print(f"  level {r['round']} ({r['sparsity_a']:.2f}%): IoU({r['label_a']}, {r['label_b']}) = {r['iou']:.4f}")
    for w in warnings:
        print(f"warning: {w}")
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
