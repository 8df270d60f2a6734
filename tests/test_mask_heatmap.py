"""analysis/mask_stats.py's kernel heatmap: the x axis counts kernels, also when a pixel bins several,
and a kept kernel (0) is drawn in a colour far from the white of the background."""

import pytest
import torch

import pruning_utils as pu
from analysis import common, mask_stats


def _colour(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.parametrize("width, per_pixel", [(64, 1), (8, 4)])
def test_the_heatmap_axis_counts_kernels_and_zero_is_not_white(tmp_path, monkeypatch, width, per_pixel):
    masks = {"conv1.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool),  # 12 kernels, all kept
             "layer1.0.conv1.weight": torch.zeros(8, 4, 3, 3, dtype=torch.bool)}  # 32 kernels, all pruned
    masks["layer1.0.conv1.weight"][0, 0, 0, 0] = True  # one kernel kept, so the ticket is valid
    path = tmp_path / "at" / "tickets" / "round_01.pt"
    pu.save_ticket(path, pu.make_ticket(masks, round=1, method="imp", retrain="st", arch="resnet_tiny", pretrain="at",
                                        init="x", source_dataset="imagenet"))
    drawn = {}
    save = common.save_figure

    def keep_axes(fig, out):
        drawn["xlim"] = fig.axes[0].get_xlim()
        drawn["xlabel"] = fig.axes[0].get_xlabel()
        return save(fig, out)

    monkeypatch.setattr(common, "save_figure", keep_axes)
    png = mask_stats.heatmap(path, tmp_path / "out", max_width=width)
    assert drawn["xlim"] == (0.0, 32.0)  # the widest layer's 32 kernels, whatever the binning
    assert ("each pixel: 4 kernels" in drawn["xlabel"]) == (per_pixel == 4)
    import matplotlib.image
    import numpy as np

    pixels = np.rint(255 * matplotlib.image.imread(png)[..., :3]).astype(int).reshape(-1, 3)
    kept, pruned = _colour(mask_stats.KEPT_COLOR), _colour(mask_stats.PRUNED_COLOR)
    assert (pixels == kept).all(axis=1).any() and (pixels == pruned).all(axis=1).any()
    assert sum(kept) < 3 * 255 / 2  # dark: a kept kernel never reads as the white background
