"""Estimate the wall time of one downstream AT run (CIFAR-10, PGD-10, 100 epochs) from measured rates.

    minutes = [ E * N_train / r_train                      training steps (bench_step --regime at)
              + V * N_val / r_eval + N_test / r_eval       clean + PGD-20 evaluation (its eval_pgd20)
              + (E * N_train + V * N_val + N_test) / r_data ] / 60     data path (bench_loader, optional)

with V = the epochs main_downstream validates: those >= --eval-from, and always the last one.
The data path is added in series, since the tensor loader shares the GPU with training.

    python benchmarks/estimate_run.py step_at.json --loader loader.json
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from study.cost import rate_at, read_record, run_seconds, validated_epochs  # noqa: E402
from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import ArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

TARGET_MINUTES = 75.0
TARGET_DATA_RATIO = 10.0


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step_json", type=Path, help="bench_step.py --regime at --json output (with its evaluation)")
    p.add_argument("--loader", type=Path, default=None, help="bench_loader.py --json output (default: none)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--eval-from", type=int, default=45, help="first validated epoch (the paper scripts pass 45)")
    p.add_argument("--train-images", type=int, default=45_000)
    p.add_argument("--val-images", type=int, default=5_000)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--json", type=Path, default=None, help="write the estimate here (default: print only)")
    return p


def estimate(step, loader=None, *, epochs=100, eval_from=45, train_images=45_000, val_images=5_000,
             test_images=10_000, step_path="step", loader_path="loader"):
    """Seconds per part of the run and in total, from the two benchmark records."""
    if step.get("regime") != "at":
        raise UserError(f"{step_path} times regime '{step.get('regime')}', not 'at'; run bench_step.py --regime at.")
    if step.get("eval_pgd20") is None:
        raise UserError(f"{step_path} has no evaluation timing; run bench_step.py without --skip-eval.")
    r_train = rate_at(step, ("engine", "images_per_s"), step_path)
    r_eval = rate_at(step, ("eval_pgd20", "engine", "images_per_s"), step_path)
    r_data = rate_at(loader, ("tensor_loader", "images_per_s"), loader_path) if loader is not None else None
    v = validated_epochs(epochs, eval_from)
    out = run_seconds(epochs=epochs, validated=v, train_images=train_images, val_images=val_images,
                      test_images=test_images, train_rate=r_train, val_rate=r_eval, test_rate=r_eval,
                      data_rate=r_data)
    out.update({"validated_epochs": v, "train_rate": r_train, "eval_rate": r_eval,
                "attack_steps": step.get("attack_steps"), "eval_steps": step["eval_pgd20"].get("steps"),
                "data_rate": r_data, "data_ratio": None if r_data is None else r_data / r_train})
    out["total_min"] = out["total_s"] / 60.0
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or min(args.train_images, args.val_images, args.test_images) < 0:
        raise UserError("--epochs must be positive and the image counts non-negative.")
    step = read_record(args.step_json, "step benchmark")
    loader = read_record(args.loader, "loader benchmark") if args.loader is not None else None
    est = estimate(step, loader, epochs=args.epochs, eval_from=args.eval_from, train_images=args.train_images,
                   val_images=args.val_images, test_images=args.test_images,
                   step_path=str(args.step_json), loader_path=str(args.loader))
    est.update({"device": step.get("device"), "arch": step.get("arch"), "image_size": step.get("image_size"),
                "batch_size": step.get("batch_size"), "epochs": args.epochs, "eval_from": args.eval_from})
    print(f"{est['device']} | {est['arch']} {est['image_size']}px batch {est['batch_size']}: "
          f"PGD-{est['attack_steps']} training at {est['train_rate']:.1f} img/s, "
          f"clean + PGD-{est['eval_steps']} evaluation at {est['eval_rate']:.1f} img/s")
    print(f"  training   {args.epochs} x {args.train_images} images      {est['train_s'] / 60:8.1f} min")
    print(f"  validation {est['validated_epochs']} x {args.val_images} images       {est['val_s'] / 60:8.1f} min")
    print(f"  test       {args.test_images} images            {est['test_s'] / 60:8.1f} min")
    if loader is not None:
        print(f"  data path  {est['data_rate']:.0f} img/s = {est['data_ratio']:.1f}x the training rate "
              f"(target >= {TARGET_DATA_RATIO:.0f}x)  {est['data_s'] / 60:8.1f} min")
    verdict = "within" if est["total_min"] <= TARGET_MINUTES else "over"
    print(f"  total {est['total_min']:.1f} min ({verdict} the {TARGET_MINUTES:.0f} min target)")
    if args.json is not None:
        atomic_write_json(est, args.json)
    return est


if __name__ == "__main__":
    run_main(main)
