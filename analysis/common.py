"""Shared by the analysis scripts: finding and reading run outputs, rebuilding a trained run's
model and test images, table writers (colours and markers: analysis/style.py)."""

import contextlib
import os
import sys
from pathlib import Path

from analysis import verdict
from analysis.style import METHOD_COLORS, PRETRAIN_COLORS, method_color, pretrain_color  # noqa: F401  (reached as common.NAME)
from utils import records
from utils.errors import UserError
from utils.rundir import csv_text, write_csv  # noqa: F401  (the tables the analysis writes)

REGIMES = records.REGIMES

PRETRAIN_ORDER = ("std", "fat", "at")
METHOD_ORDER = ("imp", "imp-st", "imp-at", "omp", "rp")


def order_key(value, preferred):
    """Sort key putting ``preferred`` values first, in that order, the rest alphabetically."""
    return (preferred.index(value), "") if value in preferred else (len(preferred), str(value))


def fmt_sparsity(value):
    """Sparsity in percent as the tables write it: 89.26."""
    return f"{value:.2f}"


def fmt_rate(rate):
    return repr(float(rate))


def fmt_rate_percent(rate):
    pct = 100.0 * float(rate)
    return f"{pct:g}%"


def agg_mean_std(values):
    """(mean, std): sample std (ddof=1) for two or more values, 0 for one (the verdict's convention)."""
    return verdict.mean_std(values)


def check_eps(value, text, flag="--eps"):
    """``value`` when it is a radius in [0, 1] pixel space (8/255, not 8), else UserError."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{flag} {text} is outside [0, 1]; images are in [0, 1] pixels, so write e.g. 8/255 "
                        "(0.0314), not 8.")
    return value


def use_agg():
    """pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_legend(fig, axes, ncol=6, y=-0.02):
    """One legend below the figure with every label of ``axes`` once, in first-seen order."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), ncol), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, y))


def save_figure(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def markdown_table(rows, fields):
    def cell(v):
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(fields) + " |", "| " + " | ".join("---" for _ in fields) + " |"]
    lines += ["| " + " | ".join(cell(r.get(f)) for f in fields) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def safe_name(text):
    """A file-name fragment from a label (letters, digits, '-', '_', '.')."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    return out.strip("._") or "x"


# --------------------------------------------------------------------------- results.json

def find_result_files(dirs):
    """Every results.json under the given directories (recursive), sorted, without duplicates."""
    if not dirs:
        raise UserError("no runs directory given; pass one or more directories holding results.json files.")
    found, cache = set(), {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise UserError(f"runs directory '{d}' does not exist; pass the --save-dir of your downstream runs "
                            "(or a folder above them).")
        if d.is_file():
            if d.name != "results.json":
                raise UserError(f"'{d}' is a file, not a runs directory; pass the folder holding the runs.")
            found.add(d.resolve())
            continue
        found.update(_results_below(d, cache))
    if not found:
        raise UserError(f"no results.json found under {', '.join(repr(str(d)) for d in dirs)}; pass the folders "
                        "main_downstream.py wrote (--save-dir), runs that have not finished have none.")
    return sorted(found)


def resolved_path(path, cache):
    """str(Path(path).resolve()), each directory resolved once per ``cache`` (a dict the caller
    keeps for one reading of the runs): thousands of run directories share their parents, so an
    absolute path below a resolved directory costs one lstat; a link, a relative path or one
    with '..' resolves in full."""
    key = ("resolved", str(path))
    hit = cache.get(key)
    if hit is None:
        p = Path(path)
        if not p.is_absolute() or p.parent == p or ".." in p.parts or os.path.islink(p):
            hit = str(p.resolve())
        else:
            hit = os.path.join(resolved_path(p.parent, cache), p.name)
        cache[key] = hit
    return hit


def _results_below(d, cache):
    """The resolved paths of every results.json below directory ``d``, as d.rglob("results.json")
    finds them (symbolic links to directories are not descended) and a file or a directory (a
    directory in its place is kept, so the reader reports it rather than pass it over), with ``d``
    resolved once: below it only a results.json that is itself a link needs resolving, since the
    walk never passes through a linked directory. ``cache``: resolved_path's, for one search."""
    top = Path(resolved_path(d, cache))
    out = []
    for root, dirnames, filenames in os.walk(d):
        if "results.json" not in filenames and "results.json" not in dirnames:
            continue
        path = os.path.join(root, "results.json")
        if not (os.path.isfile(path) or os.path.isdir(path)):
            continue  # a dangling link: rglob's exists() passes it over too
        rel = os.path.relpath(path, d)
        out.append(Path(path).resolve() if os.path.islink(path) else top / rel)
    return out


def is_dense(obj):
    """A dense (unpruned) run: method "dense" or sparsity 0 (docs/contracts.md §5)."""
    return records.is_dense_result(obj)


_PRELOADED = {}  # str(path) -> results.json as utils.records read and checked it (preloaded_results)


@contextlib.contextmanager
def preloaded_results(results):
    """Within the block, :func:`read_results` takes these {path: results} (read and checked by
    utils.records in this process moments before, as `status` does for the verdicts of its done
    runs) instead of reading the files again; any other path is read as always."""
    saved = dict(_PRELOADED)
    _PRELOADED.update({str(path): obj for path, obj in results.items()})
    try:
        yield
    finally:
        _PRELOADED.clear()
        _PRELOADED.update(saved)


def read_results(paths):
    """(list of (path, results dict), warnings): unreadable or incomplete files are named and left out.
    Each dict is the file without its per-epoch "history", which no analysis reads: at 31,000 runs
    the histories held together were most of a gigabyte."""
    good, warnings = [], []
    for path in paths:
        obj = _PRELOADED.get(str(path))
        if obj is not None:
            good.append((path if isinstance(path, Path) else Path(path), obj))
            continue
        try:
            obj = records.read_json(path, "results file", expect=object)
        except UserError as exc:
            warnings.append(f"skipped '{path}': {_reason(exc, path)}.")
            continue
        problem = records.result_problem(obj)
        if problem:
            warnings.append(f"skipped '{path}': {problem} (docs/contracts.md §3 lists the results.json keys).")
            continue
        good.append((Path(path), _compact(obj)))
    return good, warnings


def _compact(obj):
    """A results dict without its history, its keys (and its config's) shared by every run, as
    sys.intern makes them: 4.5 KB a run instead of 8 (json gives each file its own key strings)."""
    obj.pop("history", None)
    if isinstance(obj.get("config"), dict):
        obj["config"] = {sys.intern(k): v for k, v in obj["config"].items()}
    return {sys.intern(k): v for k, v in obj.items()}


def _reason(exc, path):
    """What records said about ``path``, without the file name it already led with."""
    text = str(exc).rstrip(".")
    marker = f"'{path}' "
    return text.split(marker, 1)[1] if marker in text else text


# --------------------------------------------------------------------------- trained runs

# The config.json fields the tools below read back, with what each may hold (None: null, the
# stage's default); a missing key is read as its default as well.
_CONFIG_FIELDS = {"dataset": (str,), "arch": (str, None), "data": (str, None), "image_size": (int, None),
                  "val_size": (int, None), "seed": (int, None), "workers": (int, None), "augment": (str, None),
                  "classes": (list, None), "eps": (float,), "test_eps": (float, None), "test_alpha": (float, None),
                  "test_steps": (int, None)}


def _holds(value, kinds):
    if value is None:
        return None in kinds
    if int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True
    if float in kinds and records.is_number(value):
        return True
    if list in kinds and isinstance(value, list):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return str in kinds and isinstance(value, str) and bool(value)


def read_run_config(run_dir):
    """A stage-2 run's config.json (utils.records.read_config), with the fields the analysis tools
    read back checked, so a damaged one is one line naming the file and the field."""
    path = Path(run_dir) / "config.json"
    config = records.read_config(path)
    for key, kinds in _CONFIG_FIELDS.items():
        if key not in config and (None in kinds or key == "eps"):
            continue
        if not _holds(config.get(key), kinds):
            names = {str: "a non-empty string", int: "an integer", float: "a finite number", list: "a list of integers",
                     None: "null"}
            wanted = " or ".join(names[k] for k in kinds)
            found = f"has '{key}' = {config[key]!r}, not {wanted}" if key in config else f"lacks '{key}' ({wanted})"
            raise UserError(f"run config '{path}' {found}; the run directory is damaged: rerun the run (--restart) "
                            "or pass another.")
    return config


def run_image_size(config):
    from training.setup import default_image_size

    size = config.get("image_size")
    return size if size is not None else default_image_size(config["dataset"])


def build_run_data(config, data_root=None, *, batch_size=128, device="cpu"):
    """The run's dataset (test split as in training: same image size, classes and statistics)."""
    import dataset

    if "dataset" not in config:
        raise UserError("the run's config.json has no 'dataset'; it was not written by main_downstream.py.")
    root = data_root if data_root is not None else config.get("data")
    return dataset.build_data(config["dataset"], root, image_size=run_image_size(config), batch_size=batch_size,
                              eval_batch_size=batch_size, val_size=config.get("val_size"), data_rate=1.0,
                              seed=int(config.get("seed") or 0), device=device, workers=int(config.get("workers") or 0),
                              augment=config.get("augment") or "auto", classes=config.get("classes"))


def load_run_model(run_dir, config, data, device, checkpoint="model_best.pt"):
    """(model in eval mode on ``device``, mask or None, checkpoint dict) of a finished downstream run.

    The architecture and stem come from config.json; the normalization is the one the model was
    trained with (stored in the checkpoint), which is the dataset's (``dataset.DATASET_STATS``).
    """
    import models
    from utils.checkpoint import safe_load

    path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass a finished run directory of main_downstream.py made with "
                        "--keep-model best (a sweep's runs keep no model unless the grid's [flags] say keep_model = "
                        "\"best\").")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "double-win-model":
        raise UserError(f"'{path}' is not a double-win-model checkpoint; pass a run directory of main_downstream.py.")
    arch = config.get("arch", ckpt.get("arch"))
    num_classes = int(ckpt.get("num_classes", data.num_classes))
    if num_classes != data.num_classes:
        raise UserError(f"'{path}' has {num_classes} classes but the dataset '{config['dataset']}' as configured has "
                        f"{data.num_classes}; pass the --data the run was trained on.")
    mean = ckpt.get("input_mean") or data.mean
    std = ckpt.get("input_std") or data.std
    model = models.build_model(arch, num_classes, cifar_stem=bool(config.get("cifar_stem", ckpt.get("cifar_stem"))),
                               mean=mean, std=std)
    models.load_pretrained(model, path, load_head=True)
    mask = ckpt.get("mask")
    model.to(device).eval()
    return model, mask, ckpt


def take_images(loader, max_images):
    """The first ``max_images`` test images (all when None) as a list of (images, labels) batches."""
    batches, seen = [], 0
    for images, labels in loader:
        if max_images is not None and seen + len(labels) > max_images:
            keep = max_images - seen
            images, labels = images[:keep], labels[:keep]
        if len(labels):
            batches.append((images, labels))
            seen += len(labels)
        if max_images is not None and seen >= max_images:
            break
    if not batches:
        raise UserError("the test split yielded no images; check --data and --max-images.")
    return batches
