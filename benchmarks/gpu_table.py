"""The GPU table of benchmarks/README.md, as markdown rows, from the records of benchmarks/gpu_suite.sh.

    python benchmarks/gpu_table.py OUT_DIR

One row per target whose record is in OUT_DIR: the measured figure, whether it meets the target, and
the device, torch version and date that record carries; the targets without a record are listed
below the table (their part was skipped, failed or not run), so a partial run is documented as such.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.estimate_run import TARGET_DATA_RATIO, TARGET_MINUTES  # noqa: E402
from utils.cli import ArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.records import read_json  # noqa: E402

HEADER = ("| target | measured | met | device | torch | date |\n"
          "| --- | --- | --- | --- | --- | --- |")
# the figures issue 23 sets for an H100 (ResNet-50, 89.26% sparsity, 224 px, batch 128)
AT_IMG_S, AT_SPEEDUP, ST_IMG_S, EVAL_IMG_S, FOLDER_IMG_S = 1300.0, 5.0, 4000.0, 700.0, 10_000.0


def _get(record, *keys):
    for key in keys:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _step(rec, _records):
    rate, speedup = _get(rec, "engine", "images_per_s"), _get(rec, "speedup")
    return (f"PGD-10 AT step ≥ {AT_IMG_S:,.0f} img/s and ≥ {AT_SPEEDUP:.0f}x the reference",
            f"{rate:,.0f} img/s (PGD-{rec.get('attack_steps')}), {speedup:.2f}x", rate >= AT_IMG_S and speedup >= AT_SPEEDUP)


def _step_compile(rec, _records):
    rate = _get(rec, "engine", "images_per_s")
    return (f"PGD-10 AT step, --compile, ≥ {AT_IMG_S:,.0f} img/s", f"{rate:,.0f} img/s", rate >= AT_IMG_S)


def _step_st(rec, _records):
    rate = _get(rec, "engine", "images_per_s")
    return f"ST step ≥ {ST_IMG_S:,.0f} img/s", f"{rate:,.0f} img/s", rate >= ST_IMG_S


def _eval(rec, _records):
    rate = _get(rec, "eval_pgd20", "engine", "images_per_s")
    steps = _get(rec, "eval_pgd20", "steps")
    return f"PGD-20 evaluation ≥ {EVAL_IMG_S:,.0f} img/s", f"{rate:,.0f} img/s (PGD-{steps})", rate >= EVAL_IMG_S


def _data_path(rec, records):
    rate, train = _get(rec, "tensor_loader", "images_per_s"), _get(records.get("step_at.json"), "engine", "images_per_s")
    if train is None:
        return None
    ratio = rate / train
    return (f"data path ≥ {TARGET_DATA_RATIO:.0f}x the PGD-10 consumption",
            f"{rate:,.0f} img/s = {ratio:.1f}x", ratio >= TARGET_DATA_RATIO)


def _folder(rec, _records):
    rates = {k: rec[k] for k in ("folder_uint8_img_s", "folder_nvjpeg_img_s") if k in rec}
    text = ", ".join(f"{k.split('_')[1]} {v:,.0f} img/s" for k, v in rates.items())
    return (f"image folders ≥ {FOLDER_IMG_S:,.0f} img/s into the GPU (workers: {rec.get('workers')})", text,
            max(rates.values()) >= FOLDER_IMG_S)


def _estimate(rec, _records):
    minutes = rec["total_min"]
    return (f"100-epoch CIFAR-10 PGD-10 run ≤ {TARGET_MINUTES:.0f} min (estimate)", f"{minutes:,.1f} min",
            minutes <= TARGET_MINUTES)


def _inference(rec, _records):
    rows = {row["variant"]: row for row in rec["rows"]}
    nm = rows.get("nm_2:4")
    shown = [v for v in rows if v.startswith(("nm_2:4", "channel_"))]
    text = "; ".join(f"{v} {rows[v]['throughput_speedup_paired']:.2f}x" for v in shown) + " (throughput x dense)"
    met = None if nm is None else nm["throughput_speedup_paired"] > 1.0
    return "2:4 ticket inference faster than dense", text, met


def _precision(rec, _records):
    diff = rec["ra_bf16_minus_fp32"]
    return ("bf16 vs fp32 RA on the same images", f"{diff:+.2f} points (bf16 {rec['speedup_bf16']:.2f}x faster)",
            None)


def _downstream(rec, _records):
    diff, compiled = rec["diff"], rec.get("second_run_compiled") is True
    measured = f"SA {diff['sa']:.2f}, RA {diff['ra']:.2f} points, loss {100 * diff['train_loss_rel']:.2f}% apart"
    # a --tiny suite compares two eager runs: that checks the checker, not compile
    return ("stage-2 AT run, --compile agrees with eager", measured + ("" if compiled else " (both runs eager)"),
            rec["agree"] if compiled else None)


def _tests(rec, _records):
    return ("CUDA-only tests pass", f"{rec['passed']} passed, {rec['failed']} failed, {rec['skipped']} skipped",
            rec["failed"] == 0 and rec["skipped"] == 0 and rec["passed"] > 0)


# (record, row maker), in the order of benchmarks/README.md's GPU table
ROWS = [("step_at.json", _step), ("step_at_compile.json", _step_compile), ("step_st.json", _step_st),
        ("step_at.json", _eval), ("loader.json", _data_path), ("loader_folder.json", _folder),
        ("estimate.json", _estimate), ("inference.json", _inference), ("precision.json", _precision),
        ("downstream_check.json", _downstream), ("cuda_tests.json", _tests)]


def render(out_dir):
    """(markdown lines, records missing)"""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"'{out_dir}' is not a folder; pass the OUT_DIR of benchmarks/gpu_suite.sh.")
    names = sorted({name for name, _ in ROWS})
    records = {n: read_json(out_dir / n, "suite record") for n in names if (out_dir / n).exists()}
    stamp_of = records.get("step_at.json", {})  # estimate.json carries the device only: its step's stamp
    lines, missing = [HEADER], []
    for name, make in ROWS:
        if name not in records:
            missing.append(name)
            continue
        rec = records[name]
        try:
            row = make(rec, records)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise UserError(f"{out_dir / name} lacks what its row needs ({exc!r}); rerun its part of the suite.") \
                from None
        if row is None:
            continue
        target, measured, met = row
        cells = [target, measured, {True: "yes", False: "**no**", None: "—"}[met],
                 rec.get("device") or stamp_of.get("device", "?"), rec.get("torch") or stamp_of.get("torch", "?"),
                 rec.get("date") or stamp_of.get("date", "?")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    if len(lines) == 1:
        raise UserError(f"'{out_dir}' holds none of the suite's records ({', '.join(names)}); run "
                        "benchmarks/gpu_suite.sh with it as OUT_DIR first.")
    return lines, sorted(set(missing))


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="the OUT_DIR of benchmarks/gpu_suite.sh")
    args = p.parse_args(argv)
    lines, missing = render(args.out_dir)
    print("\n".join(lines))
    if missing:
        print(f"\nNot measured (no record): {', '.join(missing)}.")


if __name__ == "__main__":
    run_main(main)
