"""A model's FLOPs per image and its size, counted from its architecture in plain Python.

`plan` prices runs that no finished run or bench record prices by their FLOPs; building the model with
torch to count them meant importing torch and torchvision, most of plan's time at 31,000 runs (issue 29).
This walks the layers that models/resnet.py builds (torchvision's BasicBlock and Bottleneck ResNets,
with or without the CIFAR stem) and counts what torch's FlopCounterMode counts of a forward pass:
2 x (in channels / groups) x out channels x kernel area x output area per convolution, 2 x in x out per
linear layer, nothing for normalization, activations or pooling. tests/test_cost_flops.py compares every
architecture models.build_model accepts with FlopCounterMode and the real model, so a change in models/
that this walk does not follow fails there. An architecture it does not know gives None: the caller
counts with torch instead.
"""

# arch: (block, blocks per stage, width per group, stage widths, stem width), as in models.resnet.ARCHS
SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64, (64, 128, 256, 512), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64, (64, 128, 256, 512), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64, (64, 128, 256, 512), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 64, (64, 128, 256, 512), 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 64, (64, 128, 256, 512), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128, (64, 128, 256, 512), 64),
    "resnet10": ("basic", (1, 1, 1, 1), 64, (64, 128, 256, 512), 64),
    "resnet_tiny": ("basic", (1, 1, 1, 1), 64, (16, 32, 64, 128), 16),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
FLOAT_BYTES, COUNT_BYTES = 4, 8  # float32 weights and statistics; BatchNorm's int64 num_batches_tracked


def _block(kind, inplanes, planes, stride, base_width):
    """The layers of one residual block in forward order: ("conv", in, out, kernel, stride, padding) each
    followed by its ("bn", channels); the downsample branch (a strided 1x1 convolution) last, on the
    block's input."""
    if kind == "basic":
        convs = [(inplanes, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
    else:
        width = int(planes * (base_width / 64.0))  # torchvision's Bottleneck, groups = 1
        convs = [(inplanes, width, 1, 1, 0), (width, width, 3, stride, 1), (width, planes * 4, 1, 1, 0)]
    layers = [layer for conv in convs for layer in (("conv", *conv), ("bn", conv[1]))]
    out = planes * EXPANSION[kind]
    if stride != 1 or inplanes != out:
        layers += [("shortcut",), ("conv", inplanes, out, 1, stride, 0), ("bn", out)]
    return layers


def layers(arch, num_classes, cifar_stem):
    """Every layer of the model that counts towards FLOPs or size, in forward order, or None for an
    architecture this walk does not know. ("shortcut",) marks where a block's downsample branch starts
    from the block's input; ("block",) where a block starts."""
    if arch not in SPECS:
        return None
    kind, blocks, base_width, widths, stem = SPECS[arch]
    out = [("conv", 3, stem, 3, 1, 1) if cifar_stem else ("conv", 3, stem, 7, 2, 3), ("bn", stem)]
    if not cifar_stem:
        out.append(("pool", 3, 2, 1))
    inplanes = stem
    for index, (planes, count) in enumerate(zip(widths, blocks)):
        for b in range(count):
            stride = 2 if index > 0 and b == 0 else 1
            out += [("block",), *_block(kind, inplanes, planes, stride, base_width)]
            inplanes = planes * EXPANSION[kind]
    return out + [("fc", inplanes, num_classes)]


def _out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def forward_flops(arch, num_classes, cifar_stem, image_size):
    """FLOPs of one image's forward pass as FlopCounterMode counts them, or None for an unknown
    architecture. Every layer keeps at least one pixel of any image: the stage's --image-size is >= 8."""
    walk = layers(arch, num_classes, cifar_stem)
    if walk is None:
        return None
    flops, size, block_input = 0, image_size, image_size
    for layer in walk:
        if layer[0] == "block":
            block_input = size
        elif layer[0] == "shortcut":
            size = block_input  # the downsample branch reads the block's input; its output matches the main one
        elif layer[0] in ("conv", "pool"):
            kernel, stride, padding = layer[-3:]
            size = _out_size(size, kernel, stride, padding)
            if layer[0] == "conv":
                flops += 2 * layer[1] * layer[2] * kernel * kernel * size * size
        elif layer[0] == "fc":
            flops += 2 * layer[1] * layer[2]
    return flops


def model_bytes(arch, num_classes, cifar_stem):
    """(state dict bytes, parameter bytes, convolution weights) of the model, or None for an unknown
    architecture. Convolutions have no bias; each BatchNorm holds weight, bias, running mean and variance
    and an int64 batch count; the input normalization's mean and std are not persistent."""
    walk = layers(arch, num_classes, cifar_stem)
    if walk is None:
        return None
    conv = sum(layer[1] * layer[2] * layer[3] ** 2 for layer in walk if layer[0] == "conv")
    bn = sum(layer[1] for layer in walk if layer[0] == "bn")
    bn_layers = sum(1 for layer in walk if layer[0] == "bn")
    fc = sum(layer[1] * layer[2] + layer[2] for layer in walk if layer[0] == "fc")
    params = (conv + 2 * bn + fc) * FLOAT_BYTES
    return params + 2 * bn * FLOAT_BYTES + bn_layers * COUNT_BYTES, params, conv
