"""2-D loss landscape around a trained ticket, with its training trajectory projected on the plane.

    python analysis/loss_landscape.py RUN_DIR --out OUT_DIR [--data DIR] [--grid 21] [--range R]
        [--num-images 256] [--directions random|pca] [--reattack]

Directions follow Li et al. (2018), "Visualizing the Loss Landscape of Neural Nets": two
Gaussian directions, each restricted to the ticket's mask (pruned entries 0) and then scaled
filter by filter (per output channel) to the norm of that filter of the trained weights; 1-D
parameters (BatchNorm weights and biases, the head's bias) and buffers get direction 0, so the
BatchNorm running statistics stay those of the trained model (evaluated in eval mode).  The loss
(mean cross-entropy) and accuracy are computed at w + x·d1 + y·d2 on a fixed set of clean test
images and on PGD images crafted once on the trained model (``--reattack``: crafted anew against
the model at every grid point, the robust loss surface, at one PGD run per point).
``--directions pca`` takes instead the two principal directions of the saved trajectory (Li et
al. §7), the plane that holds the most of the training path.  The weights before fine-tuning
(trajectory/start.pt, drawn as "start") and each saved epoch (trajectory/epoch_*.pt, both from
main_downstream.py --save-trajectory) are projected by least squares
of (w_epoch − w) onto (d1, d2) over the weights with more than one dimension; the residual is
the share of that ‖w_epoch − w‖ off the plane.

Writes landscape.png, landscape.json (grid and trajectory), landscape.csv and trajectory.csv.
"""

import json
import math
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/loss_landscape.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import common  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

GRID_FIELDS = ["x", "y", "loss_clean", "acc_clean", "loss_pgd", "acc_pgd"]
TRAJ_FIELDS = ["epoch", "file", "x", "y", "residual"]
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


def filter_normalized_directions(model, mask, seed, count=2):
    """``count`` directions {param name: tensor} (CPU, float32) as Li et al., restricted to ``mask``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    mask = mask or {}
    params = [(n, p.detach().float().cpu()) for n, p in model.named_parameters()]
    unknown = sorted(set(mask) - {n for n, _ in params})
    if unknown:
        raise UserError(f"the ticket masks {unknown[:3]} name no parameter of the model; the ticket is not of this "
                        "run's architecture.")
    directions = []
    for _ in range(count):
        d = {}
        for name, w in params:
            if w.dim() <= 1:
                d[name] = torch.zeros_like(w)
                continue
            r = torch.randn(w.shape, generator=gen)
            if name in mask:
                r = r * mask[name].to(r.dtype)
            flat_r, flat_w = r.reshape(w.shape[0], -1), w.reshape(w.shape[0], -1)
            r_norm = flat_r.norm(dim=1, keepdim=True)
            scale = torch.where(r_norm > 0, flat_w.norm(dim=1, keepdim=True) / r_norm.clamp_min(1e-12),
                                torch.zeros_like(r_norm))
            d[name] = (flat_r * scale).reshape(w.shape)
        directions.append(d)
    return directions


def project(state, center, d1, d2):
    """(x, y, residual) of the least-squares fit x·d1 + y·d2 ≈ state − center.

    Only the multi-dimensional weights take part: the 1-D parameters the directions leave out
    would otherwise count as distance off the plane.
    """
    g11 = g12 = g22 = b1 = b2 = vv = 0.0
    for name in d1:
        if d1[name].dim() <= 1:
            continue
        if name not in state:
            raise KeyError(name)
        v = (state[name].detach().double().cpu() - center[name].double())
        a, b = d1[name].double(), d2[name].double()
        g11 += float((a * a).sum())
        g12 += float((a * b).sum())
        g22 += float((b * b).sum())
        b1 += float((a * v).sum())
        b2 += float((b * v).sum())
        vv += float((v * v).sum())
    det = g11 * g22 - g12 * g12
    if det <= 0:
        raise UserError("the two directions are parallel or zero (every prunable weight pruned?); nothing to project on.")
    x = (g22 * b1 - g12 * b2) / det
    y = (g11 * b2 - g12 * b1) / det
    off = vv - 2 * (x * b1 + y * b2) + x * x * g11 + 2 * x * y * g12 + y * y * g22
    residual = math.sqrt(max(off, 0.0) / vv) if vv > 0 else 0.0
    return x, y, residual


def _loss_acc(model, batches):
    import torch
    import torch.nn.functional as F

    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in batches:
            logits = model(images).float()
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            n += len(labels)
    return loss / n, 100.0 * correct / n


def landscape_grid(model, center, d1, d2, coords, clean, adv, attack=None):
    """{metric: [[value at (coords[ix], coords[iy]) for ix] for iy]} evaluated in eval mode.

    ``adv``: adversarial batches crafted once at the centre; with ``attack`` (clean batches ->
    adversarial batches) they are crafted anew against the model at every grid point instead."""
    import torch

    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    dirs = {n: (d1[n].to(device), d2[n].to(device)) for n in d1 if bool(d1[n].any() or d2[n].any())}
    grid = {k: [[None] * len(coords) for _ in coords] for k in GRID_FIELDS[2:]}
    model.eval()
    try:
        for iy, y in enumerate(coords):
            for ix, x in enumerate(coords):
                with torch.no_grad():
                    for name, (a, b) in dirs.items():
                        params[name].copy_(center[name] + x * a + y * b)
                grid["loss_clean"][iy][ix], grid["acc_clean"][iy][ix] = _loss_acc(model, clean)
                point_adv = attack(clean) if attack is not None else adv
                grid["loss_pgd"][iy][ix], grid["acc_pgd"][iy][ix] = _loss_acc(model, point_adv)
    finally:
        model.load_state_dict(center)
    return grid


def trajectory_files(run_dir):
    """[(epoch, path)] of the saved trajectory, sorted; the weights before fine-tuning
    (trajectory/start.pt: θ_p ⊙ m with the new head) come first as epoch -1."""
    folder = Path(run_dir) / "trajectory"
    if not folder.is_dir():
        return []
    files = sorted((int(_EPOCH_FILE.search(f.name).group(1)), f) for f in folder.glob("epoch_*.pt")
                   if _EPOCH_FILE.search(f.name))
    start = folder / "start.pt"
    return ([(-1, start)] if start.is_file() else []) + files


def _trajectory_state(path):
    from utils.checkpoint import safe_load

    state = safe_load(path)
    if not isinstance(state, dict):
        raise UserError(f"'{path}' is not a state dict; the trajectory file is damaged.")
    return state


def read_trajectory(run_dir, center, d1, d2):
    """Projected epochs, sorted by epoch; [] when the run saved no trajectory."""
    points = []
    for epoch, f in trajectory_files(run_dir):
        try:
            x, y, residual = project(_trajectory_state(f), center, d1, d2)
        except KeyError as exc:
            raise UserError(f"'{f}' has no '{exc.args[0]}'; it is not a trajectory of this run's model.") from None
        points.append({"epoch": epoch, "file": f.name, "x": x, "y": y, "residual": residual})
    return points


def pca_directions(model, run_dir, center):
    """(d1, d2, explained, trajectory): the two principal directions of the saved trajectory's
    weights (Li et al., 2018, §7) as unit vectors over the multi-dimensional weights, the share of
    the trajectory's variance each explains, and the trajectory projected on them (the points of
    :func:`read_trajectory`, computed from the weights already in memory).

    Random directions in a space of millions of weights are almost orthogonal to any training
    path, so its projection on a random plane is mostly residual. The principal directions span
    the plane that fits the path best (through the path's mean, as PCA centres); the grid lays
    that plane through the trained weights instead, which the path ends near. Pruned weights are
    0 in every saved epoch, so the directions stay inside the mask by construction. Memory: one
    float32 copy of the weights per saved epoch.
    """
    import torch

    files = trajectory_files(run_dir)
    if len(files) < 3:
        raise UserError(f"--directions pca needs at least 3 saved weights in '{Path(run_dir) / 'trajectory'}' "
                        f"(found {len(files)}); rerun main_downstream.py with --save-trajectory.")
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    rows = []
    for _, f in files:
        state = _trajectory_state(f)
        missing = [n for n in names if n not in state]
        if missing:
            raise UserError(f"'{f}' has no '{missing[0]}'; it is not a trajectory of this run's model.")
        rows.append(torch.cat([(state[n].float().cpu() - center[n].float().cpu()).reshape(-1) for n in names]))
    offsets = torch.stack(rows)  # from the centre, one row per saved epoch
    gram = (offsets @ offsets.T).double()
    # eigenvectors of the small (epochs x epochs) Gram matrix of the mean-centred rows give the
    # principal axes without forming the weights x weights covariance; those with a positive
    # eigenvalue are orthogonal to the all-ones vector, so they apply to the uncentred rows as well
    n = len(rows)
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    values, vectors = torch.linalg.eigh(centring @ gram @ centring)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if values[1] <= 1e-9 * float(values[0]):
        raise UserError("the saved trajectory moves along fewer than two directions; nothing to span a plane with.")
    axes = (offsets.T @ vectors[:, :2].float()) / values[:2].sqrt().float()
    explained = (values[:2] / values.sum()).tolist()
    coords = (offsets @ axes).double()  # the axes are orthonormal: coordinates are dot products
    trajectory = []
    for (epoch, f), (x, y), length2 in zip(files, coords.tolist(), gram.diagonal().tolist()):
        off = max(length2 - x * x - y * y, 0.0)
        trajectory.append({"epoch": epoch, "file": f.name, "x": x, "y": y,
                           "residual": math.sqrt(off / length2) if length2 > 0 else 0.0})
    directions = []
    for k in range(2):
        d, pos = {}, 0
        for n, p in model.named_parameters():
            if p.dim() > 1:
                d[n] = axes[pos:pos + p.numel(), k].float().reshape(p.shape)
                pos += p.numel()
            else:
                d[n] = torch.zeros(p.shape)
        directions.append(d)
    return directions[0], directions[1], explained, trajectory


def draw_contours(fig, ax, coords, z, trajectory, name, axis_labels):
    """One panel: the loss surface ``z`` over ``coords`` x ``coords``, the trajectory and the centre."""
    import numpy as np

    xs, z = np.asarray(coords), np.asarray(z, dtype=float)
    levels = None
    if z.max() > z.min():
        # loss grows by orders of magnitude away from the minimum: log-spaced levels keep the basin visible
        levels = (np.geomspace(z.min(), z.max(), 15) if z.min() > 0 and z.max() > 10 * z.min()
                  else np.linspace(z.min(), z.max(), 15))
    filled = ax.contourf(xs, xs, z, levels=levels, cmap="viridis")
    lines = ax.contour(xs, xs, z, levels=levels, colors="white", linewidths=0.5, alpha=0.6)
    ax.clabel(lines, fontsize=6, fmt="%.2f")
    fig.colorbar(filled, ax=ax, label="cross-entropy loss")
    if trajectory:
        tx = [p["x"] for p in trajectory]
        ty = [p["y"] for p in trajectory]
        off = max(p["residual"] for p in trajectory)
        ax.plot(tx, ty, "-o", color="#ff7f0e", ms=3, lw=1.2,
                label=f"training trajectory (up to {100 * off:.0f}% off the plane)")
        first = "start" if trajectory[0]["epoch"] < 0 else f"epoch {trajectory[0]['epoch']}"
        ax.annotate(first, (tx[0], ty[0]), fontsize=7, color="#ff7f0e", xytext=(4, 4), textcoords="offset points")
        ax.annotate(f"epoch {trajectory[-1]['epoch']}", (tx[-1], ty[-1]), fontsize=7, color="#ff7f0e",
                    xytext=(4, -10), textcoords="offset points")
    ax.plot([0], [0], marker="*", color="red", ms=11, ls="none", label="trained ticket")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.legend(fontsize=7, loc="upper right")


def plot(out_path, coords, grid, trajectory, title, axis_labels=("direction 1 (filter-normalized)",
                                                                  "direction 2 (filter-normalized)"),
         pgd_name="PGD test images"):
    plt = common.use_agg()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, name in ((axes[0], "loss_clean", "clean test images"), (axes[1], "loss_pgd", pgd_name)):
        draw_contours(fig, ax, coords, grid[key], trajectory, f"loss on {name}", axis_labels)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return common.save_figure(fig, out_path)


def plot_panels(out_path, panels, key, title):
    """Several runs' landscapes in one figure, as the paper's Figs. 6 and A9 lay them out:
    ``panels`` is rows of (panel title, a landscape.json's content or None for a run not there yet);
    ``key`` the surface drawn ("loss_clean" or "loss_pgd")."""
    plt = common.use_agg()
    nrow, ncol = len(panels), max(len(row) for row in panels)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.4 * nrow), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(ncol):
            ax = axes[r][c]
            name, land = row[c] if c < len(row) else ("", None)
            if land is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{name}\n(no run yet)", ha="center", va="center", fontsize=9)
                continue
            labels = ("direction 1", "direction 2")
            draw_contours(fig, ax, land["x"], land[key], land.get("trajectory"), name, labels)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return common.save_figure(fig, out_path)


def parse_args(argv=None):
    from utils.cli import parse_fraction

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN_DIR", help="a --save-dir of main_downstream.py")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument("--data", default=None, help="dataset root (default: the run's own --data)")
    p.add_argument("--checkpoint", default="model_best.pt", help="weights in RUN_DIR at the centre (default model_best.pt)")
    p.add_argument("--grid", type=int, default=21, help="points per axis (default 21)")
    p.add_argument("--range", dest="extent", type=float, default=None,
                   help="coordinates span [-R, R] (default 1 for random directions; for pca, 1.25x the "
                        "trajectory's largest coordinate)")
    p.add_argument("--directions", choices=["random", "pca"], default="random",
                   help="random: two filter-normalized Gaussian directions in the mask (Li et al.); pca: the "
                        "two principal directions of the saved trajectory, which holds the training path")
    p.add_argument("--reattack", action="store_true",
                   help="craft the PGD images anew at every grid point (the robust loss surface; costs a "
                        "PGD run per point) instead of once at the centre")
    p.add_argument("--num-images", type=int, default=256, help="fixed test images for the loss (default 256)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", default=None, help="PGD radius (default: the run's --eps)")
    p.add_argument("--alpha", default=None, help="PGD step (default: the run's test alpha, or 2/255)")
    p.add_argument("--pgd-steps", type=int, default=None, help="PGD steps (default: the run's test steps, or 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions and the PGD random start")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.grid < 2:
        raise UserError(f"--grid must be at least 2 points per axis, not {args.grid}.")
    if args.extent is not None and not args.extent > 0:
        raise UserError(f"--range must be positive, not {args.extent}.")
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1.")
    if args.pgd_steps is not None and args.pgd_steps < 0:
        raise UserError(f"--pgd-steps must be 0 or more, not {args.pgd_steps}.")
    args.eps = None if args.eps is None else common.check_eps(parse_fraction(args.eps, "--eps"), args.eps)
    args.alpha = None if args.alpha is None else parse_fraction(args.alpha, "--alpha")
    return args


def main(argv=None):
    import torch

    import attacks

    args = parse_args(argv)
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' does not exist; pass a --save-dir of main_downstream.py.")
    from utils.distributed import resolve_device

    device = resolve_device(args.device)
    config = common.read_run_config(run_dir)
    data = common.build_run_data(config, args.data, batch_size=args.batch_size, device=device)
    clean = common.take_images(data.test, args.num_images)
    model, mask, _ = common.load_run_model(run_dir, config, data, device, checkpoint=args.checkpoint)
    center = {k: v.detach().clone() for k, v in model.state_dict().items()}

    eps = args.eps if args.eps is not None else float(config.get("test_eps") or config.get("eps", 8 / 255))
    alpha = args.alpha if args.alpha is not None else float(config.get("test_alpha") or 2 / 255)
    steps = args.pgd_steps if args.pgd_steps is not None else int(config.get("test_steps") or 20)
    torch.manual_seed(args.seed)

    def attack(batches):
        return [(attacks.pgd_attack(model, x, y, eps, alpha, steps), y) for x, y in batches]

    adv = attack(clean)
    center_cpu = {k: v.cpu() for k, v in center.items()}
    if args.directions == "pca":
        d1, d2, explained, trajectory = pca_directions(model, run_dir, center_cpu)
        labels = tuple(f"PC{k + 1} of the trajectory ({100 * e:.0f}% of its variance)" for k, e in enumerate(explained))
        described = (f"the trajectory's two principal directions (explained variance "
                     f"{explained[0]:.3f}, {explained[1]:.3f}); 1-D params and buffers 0")
    else:
        d1, d2 = filter_normalized_directions(model, mask, args.seed)
        labels = ("direction 1 (filter-normalized)", "direction 2 (filter-normalized)")
        described = "filter-normalized Gaussian, restricted to the mask; 1-D params and buffers 0"
        trajectory = read_trajectory(run_dir, center_cpu, d1, d2)
    extent = args.extent
    if extent is None:
        reach = max((max(abs(p["x"]), abs(p["y"])) for p in trajectory), default=0.0)
        extent = 1.25 * reach if args.directions == "pca" and reach > 0 else 1.0
    coords = [(-extent + 2 * extent * i / (args.grid - 1)) for i in range(args.grid)]
    grid = landscape_grid(model, center, d1, d2, coords, clean, adv, attack=attack if args.reattack else None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_images = sum(len(y) for _, y in clean)
    settings = {"run": str(run_dir), "checkpoint": args.checkpoint, "grid": args.grid, "range": extent,
                "num_images": n_images, "eps": eps, "alpha": alpha, "pgd_steps": steps, "seed": args.seed,
                "directions": described, "reattack": args.reattack}
    atomic_write_text(json.dumps({"settings": settings, "x": coords, "y": coords, **grid, "trajectory": trajectory},
                                 indent=1), out / "landscape.json")
    rows = [{"x": x, "y": y, **{k: grid[k][iy][ix] for k in GRID_FIELDS[2:]}}
            for iy, y in enumerate(coords) for ix, x in enumerate(coords)]
    common.write_csv(rows, out / "landscape.csv", GRID_FIELDS)
    common.write_csv(trajectory, out / "trajectory.csv", TRAJ_FIELDS)
    sparsity = ""
    if mask:
        import pruning_utils as pu

        sparsity = f", {pu.sparsity(mask):.2f}% sparse"
    title = f"{config.get('dataset')} {config.get('regime', '')} {config.get('arch')}{sparsity} — {run_dir.name}"
    pgd_name = f"PGD-{steps} images, " + ("re-crafted at every point" if args.reattack else "crafted at the centre")
    png = plot(out / "landscape.png", coords, grid, trajectory, title, labels, pgd_name)

    mid = args.grid // 2
    print(f"loss at the centre: clean {grid['loss_clean'][mid][mid]:.4f}, PGD {grid['loss_pgd'][mid][mid]:.4f} "
          f"({n_images} images, PGD-{steps})" if args.grid % 2 else f"grid of {args.grid}x{args.grid} points")
    if not trajectory:
        print(f"note: '{run_dir / 'trajectory'}' holds no epoch_*.pt; rerun main_downstream.py with "
              "--save-trajectory to draw the training path.")
    elif any(abs(p["x"]) > extent or abs(p["y"]) > extent for p in trajectory):
        print("note: part of the trajectory lies outside the grid; a larger --range shows the landscape there.")
    print(f"wrote {png}, {out / 'landscape.json'}, {out / 'landscape.csv'}, {out / 'trajectory.csv'}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
