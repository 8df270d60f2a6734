"""What a study will cost before it is paid for: GPU-hours and disk of every planned stage-2 run, summed
per group, per grid file and over the unique runs of several grid files (runs that share a directory
are one run), with the source of every number named.

Time comes from one of two sources, never from a guess:
- finished runs: the epoch ``seconds`` of the results.json histories found in the run tree(s), matched
  by (dataset, regime, arch), times the run's world size, fitted as ``a x data rate + b x validated``
  per epoch (training scales with the data rate, validation does not) and applied to the planned
  run's epochs and validated epochs (the final test pass is not in the history, as in `status`);
- a benchmark record of ``benchmarks/bench_step.py --json`` of the same regime, architecture, image
  size, stem and attack steps, through ``run_seconds`` (benchmarks/estimate_run.py's formula too).
Where neither fits, an analytic estimate, labelled as such: the model's FLOPs per image, counted as
torch's FlopCounterMode counts them, from the architecture without importing torch (study/flops.py; a
training step 3x a forward pass, each PGD step 2x), at an assumed achieved rate (``--assume-tflops``,
default 250 TFLOP/s: a quarter of an H100's dense bf16 peak, the engine's aim), beside the
bench_step.py command that would measure it instead.
Disk: the mean size of finished run directories that kept the same files, else the model's size
(from its parameter count) times the model files a run keeps, plus its records.
"""

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from study import flops
from study.grid import REGIMES
from study.status import dir_bytes, human_bytes
from utils.errors import UserError
from utils.records import is_number, read_json, read_results

# Training-split and test-split sizes of the array datasets (data_loading.readers; digits: scikit-learn's
# 1,797 images less every fifth of each class). A folder dataset's size is known only by reading it.
TRAIN_SPLIT = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "digits": 1_442}
TEST_SPLIT = {"cifar10": 10_000, "cifar100": 10_000, "svhn": 26_032, "digits": 355}
# Records beside the model files, as measured on a finished digits run (2026-12): config.json, run_info.json,
# results.json's head, the logs' headers (bytes), and one epoch's rows of results.json, log.csv and
# .sweep.log (bytes per epoch); subset_indices.json adds one indented line per index. Small next to any
# model file.
RECORD_BYTES, EPOCH_BYTES = 4_000, 350
BENCH_HINT = "run benchmarks/bench_step.py --json FILE and pass --bench FILE"
# the analytic fallback's achieved throughput: 25% of an H100 SXM's dense bf16 peak (989 TFLOP/s)
ASSUMED_TFLOPS = 250.0


@dataclass
class Estimate:
    seconds: object  # float, or None: no source
    disk: object  # bytes, or None: a dataset of unknown size and no finished run
    source: str  # where ``seconds`` came from, or why there is none
    disk_source: str


# --------------------------------------------------------------------------- what a run will do

@functools.lru_cache(maxsize=None)
def _config(argv):
    from training.downstream_args import config_for  # the stage's own defaults: epochs, eval_from, image size

    return config_for(list(argv))


def profile(run):
    """What of a planned run its cost depends on, from main_downstream.py's own resolved config."""
    from data_loading.catalog import NATIVE_SIZE, NUM_CLASSES
    from training.common_args import default_image_size

    # one config per kind of run: the seed, directory, θ_p and ticket paths do not change the cost
    argv = run.argv()
    for flag in ("--seed", "--save-dir", "--init", "--ticket"):
        i = argv.index(flag)
        argv[i + 1] = {"--seed": "1", "--save-dir": "x", "--init": "none" if str(run.init).lower() == "none"
                       else "p"}.get(flag, "none" if run.ticket is None else "t")
    c = _config(tuple(argv))
    return {"dataset": run.dataset, "regime": run.regime, "data_rate": float(run.data_rate), "arch": c["arch"],
            "epochs": c["epochs"], "eval_from": c["eval_from"], "cifar_stem": bool(c["cifar_stem"]),
            "image_size": c["image_size"] or default_image_size(run.dataset) or NATIVE_SIZE[run.dataset],
            "attack_steps": {"st": 0, "fat": 1, "at": c["train_steps"]}[run.regime], "test_steps": c["test_steps"],
            "batch_size": c["batch_size"], "classes": c["classes"], "val_size": c["val_size"],
            "ticket": run.ticket is not None, "kept": kept_files(c, run.regime),
            "num_classes": len(c["classes"]) if c["classes"] else NUM_CLASSES.get(run.dataset)}


def kept_files(config, regime):
    """The model files a finished run keeps (docs/contracts.md §3): checkpoint.pt is removed at the end
    unless --keep-checkpoint; model_best.pt (and model_best_sa.pt) unless --keep-model none, the
    default of the sweep's runs (a run recorded before the flag kept it)."""
    best = config.get("keep_model", "best") != "none"
    return (bool(config.get("keep_checkpoint")), bool(config.get("save_trajectory")),
            best and bool(config.get("keep_sa_best")) and regime != "st", best)


def images(p):
    """(training, validation, test) images of a run, or None for a dataset whose size is unknown here."""
    from data_loading.splits import resolve_val_size

    if p["dataset"] not in TRAIN_SPLIT:
        return None
    share = 1.0
    if p["classes"]:
        from data_loading.catalog import NUM_CLASSES

        share = len(p["classes"]) / NUM_CLASSES[p["dataset"]]
    full = round(TRAIN_SPLIT[p["dataset"]] * share)
    val = resolve_val_size(p["dataset"], full, p["val_size"])
    return round((full - val) * p["data_rate"]), val, round(TEST_SPLIT[p["dataset"]] * share)


def validated_epochs(epochs, eval_from):
    """The epochs main_downstream.py validates: those >= --eval-from, and always the last one."""
    return sum(1 for e in range(epochs) if e >= eval_from or e == epochs - 1)


def run_seconds(*, epochs, validated, train_images, val_images, test_images, train_rate, val_rate, test_rate,
                data_rate=None):
    """Seconds per part of one run and in total, from measured rates (images per second):
    ``epochs x train_images / train_rate`` of training, ``validated x val_images / val_rate`` of
    validation, ``test_images / test_rate`` of the final test (the validation and test rates apart: a
    standard run validates clean images only but tests under PGD), and with ``data_rate`` every one
    of those images again through the data path, in series (the tensor loader shares the GPU)."""
    out = {"train_s": epochs * train_images / train_rate,
           "val_s": validated * val_images / val_rate if validated and val_images else 0.0,
           "test_s": test_images / test_rate if test_images else 0.0,
           "data_s": 0.0}
    if data_rate is not None:
        out["data_s"] = (epochs * train_images + validated * val_images + test_images) / data_rate
    out["total_s"] = out["train_s"] + out["val_s"] + out["test_s"] + out["data_s"]
    return out


def _validated(p):
    return validated_epochs(p["epochs"], p["eval_from"])


# --------------------------------------------------------------------------- source (a): bench records

def read_record(path, what):
    """The JSON a benchmark's --json wrote (``what`` names its kind), or one UserError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist; write it with the benchmark's --json.") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} file {path} is not readable JSON ({exc}); rerun the benchmark with --json.") from None


def rate_at(record, keys, path):
    """The positive number at ``record[keys[0]][keys[1]]...``, else a UserError naming ``path``."""
    node = record
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, (int, float)) or isinstance(node, bool) or not node > 0:
        raise UserError(f"{path} has no positive {'.'.join(keys)}; pass a file written by the matching benchmark.")
    return float(node)


def read_bench(path):
    """A bench_step.py --json record, checked: one UserError naming the file and the fix otherwise."""
    rec = read_record(path, "bench record")
    what = f"bench record '{path}' is not a benchmarks/bench_step.py --json record"
    if not isinstance(rec, dict):
        raise UserError(f"{what} (it holds a JSON {type(rec).__name__}); {BENCH_HINT}.")
    for key, ok in (("regime", lambda v: v in REGIMES), ("arch", lambda v: isinstance(v, str) and v),
                    ("image_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
                    ("attack_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                    ("cifar_stem", lambda v: isinstance(v, bool))):
        if not ok(rec.get(key)):
            raise UserError(f"{what} (its '{key}' is {rec.get(key)!r}); {BENCH_HINT}.")
    rate_at(rec, ("engine", "images_per_s"), path)
    for part in ("eval_pgd20", "eval_clean"):
        if rec.get(part) is not None:
            rate_at(rec, (part, "engine", "images_per_s"), path)
    if rec.get("eval_pgd20") is not None and not is_number(rec["eval_pgd20"].get("steps")):
        raise UserError(f"{what} (eval_pgd20 has no 'steps'); {BENCH_HINT}.")
    return {**rec, "path": str(path)}


def bench_command(p):
    """The bench_step.py command whose record prices runs like ``p``."""
    parts = [f"python benchmarks/bench_step.py --regime {p['regime']} --arch {p['arch']} "
             f"--image-size {p['image_size']}"]
    if p["cifar_stem"]:
        parts.append("--cifar-stem")
    if p["regime"] == "at":
        parts.append(f"--attack-steps {p['attack_steps']}")
    if p["test_steps"]:
        parts.append(f"--eval-steps {p['test_steps']}")
    return " ".join(parts + [f"--batch-size {p['batch_size']} --json FILE"])


def bench_seconds(p, record):
    """Seconds of a run like ``p`` from a matching bench record, or None when the record does not fit."""
    fits = (record["regime"], record["arch"], record["image_size"], record["cifar_stem"], record["attack_steps"]) == \
        (p["regime"], p["arch"], p["image_size"], p["cifar_stem"], p["attack_steps"])
    counts = images(p)
    if not fits or counts is None:
        return None
    robust = record.get("eval_pgd20")
    clean = record.get("eval_clean")
    if p["test_steps"] and (robust is None or robust["steps"] != p["test_steps"]):
        return None  # the run attacks its test (and, adversarially trained, its validation) with these steps
    # a standard run validates clean images; an adversarial one validates under the test attack
    val_part = robust if p["regime"] != "st" else clean
    test_part = robust if p["test_steps"] else clean
    if val_part is None or test_part is None:
        return None
    train, val, test = counts
    return run_seconds(epochs=p["epochs"], validated=_validated(p), train_images=train, val_images=val,
                       test_images=test, train_rate=record["engine"]["images_per_s"],
                       val_rate=val_part["engine"]["images_per_s"],
                       test_rate=test_part["engine"]["images_per_s"])["total_s"]


# --------------------------------------------------------------------------- the analytic fallback

@functools.lru_cache(maxsize=None)
def _model(arch, num_classes, cifar_stem):
    """The model of a kind, built once for its FLOPs and its size, on the meta device: a forward pass
    there computes shapes only, which is all FlopCounterMode counts from."""
    import models

    return models.build_model(arch, num_classes, cifar_stem=cifar_stem).eval().to("meta")


@functools.lru_cache(maxsize=None)
def forward_flops(arch, num_classes, cifar_stem, image_size):
    """FLOPs of one image's forward pass, counted (dense kernels: a ticket's zeros are still computed): from
    the architecture without torch (study/flops.py), else by torch's FlopCounterMode on the model."""
    counted = flops.forward_flops(arch, num_classes, cifar_stem, image_size)
    if counted is not None:
        return counted
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _model(arch, num_classes, cifar_stem)(torch.zeros(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops()


def analytic_seconds(p, tflops):
    """GPU-seconds of a run like ``p`` from counted FLOPs at ``tflops`` achieved, or None (unknown size)."""

    counts = images(p)
    if counts is None:
        return None
    f = forward_flops(p["arch"], p["num_classes"], p["cifar_stem"], p["image_size"])
    train_flops = 3 * f + 2 * f * p["attack_steps"]  # the step, and each attack step's gradient to the input
    clean, robust = f, f + 2 * f * p["test_steps"]  # the test attack, then its forward pass
    val_flops = clean + (robust if p["regime"] != "st" else 0)
    test_flops = clean + (robust if p["test_steps"] else 0)
    train, val, test = counts
    total = (p["epochs"] * train * train_flops + _validated(p) * val * val_flops + test * test_flops)
    return total / (tflops * 1e12)


# --------------------------------------------------------------------------- source (b): finished runs

@dataclass
class Finished:
    key: tuple  # (dataset, regime, arch)
    rows: list  # (data rate, validated, GPU-seconds) per epoch
    disk: int
    kept: tuple


def finished_runs(roots):
    """Every finished stage-2 run below the run trees ``roots`` (a damaged one is no evidence: skipped)."""
    found, seen = [], set()
    for root in roots:
        for here, dirs, files in os.walk(root):
            if "results.json" not in files:
                continue
            dirs[:] = []  # a run directory's subfolders (trajectory/) hold no other run
            real = os.path.realpath(here)
            if real in seen:
                continue
            seen.add(real)
            with contextlib.suppress(UserError):
                found.append(_finished(Path(here)))
    return [f for f in found if f is not None]


def _finished(run_dir):
    res = read_results(run_dir / "results.json")
    config = res.get("config") if isinstance(res.get("config"), dict) else {}
    world = 1
    if (run_dir / "run_info.json").is_file():
        info = read_json(run_dir / "run_info.json", "run info")
        world = info.get("world_size") if isinstance(info.get("world_size"), int) and info["world_size"] > 0 else 1
    rows = [(float(res["data_rate"]), row.get("val_sa") is not None, float(row["seconds"]) * world)
            for row in res.get("history") or [] if isinstance(row, dict) and is_number(row.get("seconds"))]
    if not rows:
        return None
    return Finished(key=(res["dataset"], res["regime"], res["arch"]), rows=rows, disk=dir_bytes(run_dir),
                    kept=kept_files(config, res["regime"]))


def fit(rows):
    """(a, b, note): epoch seconds = a x data rate + b x validated, least squares with a, b >= 0. One data
    rate with every epoch validated cannot tell the two apart: the whole epoch then scales with the rate."""
    srr = sum(r * r for r, _, _ in rows)
    srv = sum(r for r, v, _ in rows if v)
    svv = sum(1 for _, v, _ in rows if v)
    srs = sum(r * s for r, _, s in rows)
    svs = sum(s for _, v, s in rows if v)
    det = srr * svv - srv * srv
    if det > 1e-9 * srr * max(svv, 1):
        a, b = (srs * svv - svs * srv) / det, (svs * srr - srs * srv) / det
        if a < 0:
            return 0.0, svs / svv, ""
        if b < 0:
            return srs / srr, 0.0, ""
        return a, b, ""
    return srs / srr, 0.0, "validation not separable from training: whole epochs scaled by the data rate"


def fit_evidence(evidence):
    """(a, b, note, data rates) of the finished runs of one (dataset, regime, arch): ``fit`` of all their epochs."""
    rows = [row for f in evidence for row in f.rows]
    return (*fit(rows), {r for r, _, _ in rows})


def history_seconds(p, fitted):
    """(seconds, note) of a run like ``p`` from ``fit_evidence`` of the finished runs of its (dataset, regime, arch)."""
    a, b, note, rates = fitted
    if note and rates == {p["data_rate"]}:
        note = ""  # the same data rate: the measured epochs apply as they are
    v = _validated(p)
    return p["epochs"] * a * p["data_rate"] + v * b, note


# --------------------------------------------------------------------------- disk

@functools.lru_cache(maxsize=None)
def model_bytes(arch, num_classes, cifar_stem):
    """(state dict bytes, parameter bytes, convolution weights) of a model: from its architecture without
    torch (study/flops.py), else from the model, built once per kind."""
    counted = flops.model_bytes(arch, num_classes, cifar_stem)
    if counted is not None:
        return counted
    import torch

    model = _model(arch, num_classes, cifar_stem)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return state, params, conv


def model_disk(p):
    """Bytes a finished run like ``p`` leaves: model_best.pt (weights, and the mask of a ticket run, one
    byte per convolution weight) unless --keep-model none, model_best_sa.pt, checkpoint.pt (weights and SGD momentum) and the
    trajectory where the flags keep them, and its records; None for a dataset of unknown size."""

    counts = images(p)
    if counts is None:
        return None
    state, params, conv = model_bytes(p["arch"], p["num_classes"], p["cifar_stem"])
    mask = conv if p["ticket"] else 0
    keep_checkpoint, trajectory, sa_best, best = p["kept"]
    files = (state + mask) * (best + sa_best) + (state + params + mask) * keep_checkpoint
    files += state * (p["epochs"] + 1) * trajectory
    index_bytes = len(str(TRAIN_SPLIT[p["dataset"]])) + 6  # one indented line per index
    return files + RECORD_BYTES + EPOCH_BYTES * p["epochs"] + index_bytes * (counts[0] + counts[1])


# --------------------------------------------------------------------------- pricing a study

class Pricer:
    """Estimates of planned runs from the finished runs below ``roots`` and the bench records ``bench``."""

    def __init__(self, roots, bench=(), tflops=ASSUMED_TFLOPS):
        self.records = [read_bench(path) for path in bench]
        self.tflops = tflops
        self.evidence = {}
        for f in finished_runs(sorted({str(r) for r in roots})):
            self.evidence.setdefault(f.key, []).append(f)
        self.fits = {key: fit_evidence(evidence) for key, evidence in self.evidence.items()}
        self.cache, self.kinds = {}, {}

    def estimate(self, run):
        if run.run_dir not in self.cache:
            # one estimate for the runs that differ only in seed and directory, which ``profile`` sets aside, as
            # Run.acting_flags depends on the rest alone: building every run's command line was most of plan
            # at 31,000 runs
            kind = (run.dataset, run.regime, float(run.data_rate), run.pretrain,
                    str(run.ticket) if run.ticket else "none", run.init,
                    tuple((k, type(v), repr(v)) for k, v in run.flags.items()))
            if kind not in self.kinds:
                self.kinds[kind] = self._estimate(profile(run))
            self.cache[run.run_dir] = self.kinds[kind]
        return self.cache[run.run_dir]

    def _estimate(self, p):
        key = (p["dataset"], p["regime"], p["arch"])
        evidence = self.evidence.get(key, [])
        seconds = None
        if evidence:
            seconds, note = history_seconds(p, self.fits[key])
            source = (f"{len(evidence)} finished {'/'.join((p['dataset'], p['regime'], p['arch']))} "
                      f"run{'s' if len(evidence) > 1 else ''}" + (f" ({note})" if note else ""))
        else:
            for record in self.records:
                seconds = bench_seconds(p, record)
                if seconds is not None:
                    source = f"bench {record['path']} ({record.get('device') or 'device not recorded'})"
                    break
            else:
                seconds = analytic_seconds(p, self.tflops)
                source = _no_estimate(p) if seconds is None else (
                    f"analytic: {forward_flops_text(p)} per image, counted, at an assumed {self.tflops:g} TFLOP/s "
                    f"achieved (--assume-tflops); for a measured rate {_no_estimate(p)[len('no estimate: '):]}")
        same = [f.disk for f in evidence if f.kept == p["kept"]]
        if same:
            disk, disk_source = sum(same) / len(same), "finished runs"
        else:
            disk, disk_source = model_disk(p), "model size"
        return Estimate(seconds=seconds, disk=disk, source=source, disk_source=disk_source)


def forward_flops_text(p):

    f = forward_flops(p["arch"], p["num_classes"], p["cifar_stem"], p["image_size"])
    return f"{f / 1e9:.3g} GFLOP" if f >= 1e8 else f"{f / 1e6:.3g} MFLOP"


def _no_estimate(p):
    if images(p) is None:
        return (f"no estimate: a {p['dataset']} dataset's size is known only from finished runs; finish one "
                f"{p['regime']} run of {p['arch']} on it and plan again")
    return f"no estimate: run {bench_command(p)} and pass --bench FILE"


def _group_order(key):
    dataset, rate, pretrain, method, regime = key
    return dataset, -rate, pretrain, "" if method == "dense" else method, REGIMES.index(regime)


def _sum(estimates, what):
    known = [getattr(e, what) for e in estimates if getattr(e, what) is not None]
    return sum(known), len(estimates) - len(known)


def hours_text(seconds):
    """GPU-hours as printed: whole hours from 100 on, tenths from 1 on, thousandths below."""
    hours = seconds / 3600
    return f"{hours:.0f}" if hours >= 100 else f"{hours:.1f}" if hours >= 1 else f"{hours:.3f}"


def _hours(seconds, missing):
    return "-" if missing else hours_text(seconds)


def _totals_line(name, runs, pricer, done):
    est = [pricer.estimate(r) for r in runs]
    seconds, missing = _sum(est, "seconds")
    left, _ = _sum([e for r, e in zip(runs, est) if r.run_dir not in done], "seconds")
    disk, no_disk = _sum(est, "disk")
    n_done = sum(r.run_dir in done for r in runs)
    if not runs or missing < len(runs):
        hours = f"{hours_text(seconds)} GPU-hours ({hours_text(left)} for the runs not done)"
    else:
        hours = "no GPU-hour estimate"
    if missing and missing < len(runs):
        hours += f" for {len(runs) - missing} runs; {missing} runs have no estimate (see the time sources)"
    size = f"disk {human_bytes(disk)}" + (f" ({no_disk} runs without a disk estimate)" if no_disk else "")
    return f"{name}: {len(runs)} runs ({n_done} done), {hours}, {size}"


def cost_lines(planned, pricer, done=frozenset()):
    """The cost report: per grid file a table of its groups and its total, then (for several grid files)
    the unique total, then what each source is. ``planned``: [(name, runs)]; ``done``: finished run dirs."""
    from study.status import _table

    lines, notes = [], []
    for name, runs in planned:
        groups = {}
        for r in runs:
            groups.setdefault(r.group, []).append(r)
        rows = []
        for key in sorted(groups, key=_group_order):
            members = groups[key]
            est = [pricer.estimate(r) for r in members]
            seconds, missing = _sum(est, "seconds")
            left, left_missing = _sum([e for r, e in zip(members, est) if r.run_dir not in done], "seconds")
            disk, no_disk = _sum(est, "disk")
            sources = sorted({e.source for e in est})
            marks = []
            for s in sources:
                if s not in notes:
                    notes.append(s)
                marks.append(f"[{notes.index(s) + 1}]")
            rows.append([key[0], f"{key[1]:g}", key[2], key[3], key[4], len(members),
                         sum(r.run_dir in done for r in members), _hours(seconds, missing),
                         _hours(left, left_missing), "-" if no_disk else human_bytes(disk), " ".join(marks)])
        header = ["dataset", "rate", "pretrain", "method", "regime", "runs", "done", "GPU-h", "GPU-h left", "disk",
                  "time source"]
        lines += [f"cost of {name}:", *_table(header, rows), _totals_line(name, runs, pricer, done), ""]
    if len(planned) > 1:
        unique = list({r.run_dir: r for _, runs in planned for r in runs}.values())
        shared = sum(len(runs) for _, runs in planned) - len(unique)
        lines += [_totals_line(f"all {len(planned)} grid files ({shared} runs shared between them counted once)",
                               unique, pricer, done), ""]
    lines += ["time sources:", *(f"[{i}] {s}" for i, s in enumerate(notes, 1))]
    return lines


# --------------------------------------------------------------------------- a smaller study

def select(planned, seeds=None, datasets=None, levels=None):
    """Only the planned runs of the given seeds, datasets and levels (ticket rounds; dense baselines stay, as
    every level is compared with them). ``planned``: [(name, runs)]. A value that no grid file of
    ``planned`` has is a UserError naming it and the values there are."""
    every = [r for _, runs in planned for r in runs]
    for flag, values, have in (("--seeds", seeds, {r.seed for r in every}),
                               ("--datasets", datasets, {r.dataset for r in every}),
                               ("--levels", levels, {r.round for r in every if r.round is not None})):
        missing = [v for v in values or () if v not in have]
        if missing:
            where = "the grid file has not (it has" if len(planned) == 1 else "none of the grid files has (they have"
            raise UserError(f"{flag} names {', '.join(map(str, missing))}, which {where} "
                            f"{', '.join(map(str, sorted(have))) or 'none'}); pick among those.")

    def keep(r):
        return ((not seeds or r.seed in seeds) and (not datasets or r.dataset in datasets)
                and (not levels or r.round is None or r.round in levels))

    return [(name, [r for r in runs if keep(r)]) for name, runs in planned]
