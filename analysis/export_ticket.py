"""Turn a structured ticket into a network that really runs faster (issue 14, item 4).

    python analysis/export_ticket.py TICKET --init THETA --arch A --num-classes K [--cifar-stem] --out PATH

* a **channel** ticket becomes a physically smaller dense ResNet: each block-internal conv keeps
  only its alive filters, its BatchNorm those channels and the next conv those input channels.
  The file is a normal ``double-win-model`` checkpoint plus ``channels`` (the kept width of every
  internal conv), which ``models.export.load_exported(PATH)`` rebuilds and loads through
  ``models.load_pretrained``.  Before writing, the smaller net's logits are checked against the
  masked full-size net's on random inputs in eval mode (``--tolerance``, default 1e-5).
* a **2:4** ticket (``--pattern nm --nm 2:4`` in stage 1) runs its convs through
  ``torch.sparse.to_sparse_semi_structured`` on a GPU of compute capability 8.0 or newer
  (``--device cuda``); elsewhere it is refused with one line.  Semi-structured tensors cannot be
  stored in a ``weights_only`` checkpoint, so the file written is the masked dense model (with
  ``pattern``/``nm`` recorded), and ``models.export.to_semi_structured`` converts it at load time on
  the GPU; the command checks that the converted net agrees with the dense one (fp16).

THETA is any checkpoint the importers read: θ_p or a stage-2 ``model_best.pt``.
"""

import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/export_ticket.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import models  # noqa: E402
import pruning_utils as pu  # noqa: E402
from models.export import check_semi_structured_support, export_channel_model, to_semi_structured  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.records import refuse_overwriting_inputs  # noqa: E402


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ticket", help="ticket file from main_imp_pretrain.py (--pattern channel or nm)")
    p.add_argument("--init", required=True, help="weights to export: θ_p or a stage-2 model_best.pt")
    p.add_argument("--arch", required=True, choices=list(models.ARCHS))
    p.add_argument("--num-classes", "--num_classes", type=int, required=True)
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stem without max-pool (native 32 px models)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--device", default="cpu", help="cpu or cuda (2:4 tickets need a GPU of compute capability >= 8.0)")
    p.add_argument("--image-size", type=int, default=None, help="size of the random check images (default 32 with "
                   "the CIFAR stem, else 64)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest |logit difference| allowed (channel, fp32)")
    return p


def load_model(args, device):
    model = models.build_model(args.arch, args.num_classes, cifar_stem=args.cifar_stem)
    info = models.load_pretrained(model, args.init, load_head="auto")
    if info["dropped_head"]:
        print(f"note: the head of '{args.init}' does not fit {args.num_classes} classes; the exported head is "
              "freshly initialised (fine-tune it, e.g. with main_downstream.py)", file=sys.stderr)
    if info["file_normalization"] is not None:
        models.set_normalization(model, *info["file_normalization"])
    return model.to(device).eval()


def check_images(args, device, dtype=torch.float32):
    size = args.image_size or (32 if args.cifar_stem else 64)
    return torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def export_channel(args, ticket, model, device):
    masked = copy.deepcopy(model)
    pu.apply_mask(masked, ticket["masks"], pattern="channel")
    small, channels = export_channel_model(masked, ticket["masks"])
    small.eval()
    x = check_images(args, device)
    with torch.no_grad():
        diff = float((small(x) - masked(x)).abs().max())
    if not diff <= args.tolerance:
        raise UserError(f"the exported network's logits differ from the masked model's by {diff:.2e} "
                        f"(> --tolerance {args.tolerance}); the ticket and weights do not fit, re-export from the "
                        "ticket's own weights.")
    models.save_model_checkpoint(args.out, small, channels=channels, pattern="channel",
                                 ticket=str(args.ticket), ticket_sparsity=float(ticket["sparsity"]),
                                 filter_sparsity=float(pu.filter_sparsity(ticket["masks"])))
    print(f"wrote {args.out}: {count_params(small):,} parameters instead of {count_params(model):,} "
          f"({pu.filter_sparsity(ticket['masks']):.2f}% of internal filters removed); "
          f"max |logit difference| {diff:.1e}")


def export_nm(args, ticket, model, device):
    if list(ticket["nm"]) != [2, 4]:
        raise UserError(f"the ticket is {ticket['nm'][0]}:{ticket['nm'][1]}, but the sparse tensor cores run 2:4 "
                        "only; find the ticket with --pattern nm --nm 2:4.")
    check_semi_structured_support(device)
    pu.apply_mask(model, ticket["masks"])
    dense = model.half()
    sparse = copy.deepcopy(dense)
    converted, kept_dense = to_semi_structured(sparse, ticket["masks"])
    if not converted:
        raise UserError("no conv of this ticket fits the 2:4 kernels' shape limits; nothing to export.")
    x = check_images(args, device, torch.float16)
    with torch.no_grad():
        reference = dense(x).float()
        diff = float((sparse(x).float() - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    if not diff <= 1e-2 * scale:  # fp16 GEMMs of different tiling: agree to ~1e-3 relative
        raise UserError(f"the semi-structured network's logits differ from the dense masked one's by {diff:.2e}; "
                        "this GPU's sparse kernels disagree, so nothing was written.")
    models.save_model_checkpoint(args.out, model.float(), pattern="nm", nm=[2, 4], ticket=str(args.ticket),
                                 ticket_sparsity=float(ticket["sparsity"]))
    print(f"wrote {args.out} (masked dense, 2:4): {len(converted)} convs run semi-structured on "
          f"{torch.cuda.get_device_name(device)}, {len(kept_dense)} stay dense ({', '.join(kept_dense) or 'none'}); "
          f"max |logit difference| {diff:.1e} in fp16")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_classes < 1:
        raise UserError(f"--num-classes must be a positive number, not {args.num_classes}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device '{args.device}' is not a device; use cpu or cuda.") from None
    refuse_overwriting_inputs(args.out, [("ticket", args.ticket), ("--init weights", args.init)])
    ticket = pu.load_ticket(args.ticket)
    if ticket["arch"] not in (args.arch, "unknown"):
        raise UserError(f"the ticket was found in {ticket['arch']} but --arch is {args.arch}; pass --arch {ticket['arch']}.")
    pattern = ticket["pattern"]
    if pattern == "unstructured":
        raise UserError("an unstructured ticket has no faster dense form (its zeros are scattered); export a ticket "
                        "found with --pattern channel or --pattern nm.")
    if pattern == "nm":  # refuse a CPU before reading any weights
        check_semi_structured_support(device)
    elif device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asks for a GPU but torch sees none; use --device cpu.")
    model = load_model(args, device)
    if pattern == "channel":
        export_channel(args, ticket, model, device)
    else:
        export_nm(args, ticket, model, device)
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
