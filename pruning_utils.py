"""Mask math, ticket files and sparsity statistics: the public entry.

The concepts live one per module in ``masks/`` (prunable weights, the unstructured / channel / N:M
patterns, statistics, mask enforcement, the ticket file) and the export of tickets to smaller or
semi-structured models in ``models/export.py``; this module hands on the names callers use, so
``import pruning_utils`` keeps working for the entry scripts, the analysis tools and the tests.
"""

from masks.channel import (
    ChannelGroup,
    alive_filters,
    alive_inputs,
    channel_groups,
    channel_prune,
    complete_channel_mask,
    layerwise_channel_prune,
    random_channel_prune,
)
from masks.enforce import MaskEnforcer, apply_mask, check_mask_fits, mask_gradients
from masks.nm import nm_dense_layers, nm_groups_fit, nm_prune, parse_nm, random_nm_prune
from masks.patterns import PATTERNS, derived_masks
from masks.prunable import full_mask, mask_from_weights_nonzero, prunable_names
from masks.stats import filter_sparsity, layer_sparsity, mask_iou, sparsity, zero_kernels
from masks.ticket import (
    REWINDS,
    SPARSITY_TOLERANCE,
    TICKET_FORMAT,
    TICKET_METHODS,
    TICKET_RETRAIN,
    TICKET_VERSION,
    TICKET_VERSIONS_READ,
    load_ticket,
    make_ticket,
    save_ticket,
    seed_round_from_sparsity,
    ticket_family,
    validate_ticket,
)
from masks.unstructured import (
    global_magnitude_prune,
    imp_pruned_count,
    imp_sparsity,
    layerwise_magnitude_prune,
    prune_to_sparsity,
    random_prune,
)
from models.export import (
    SemiStructuredConv2d,
    build_exported_model,
    check_semi_structured_support,
    export_channel_model,
    load_exported,
    to_semi_structured,
)

__all__ = [
    "PATTERNS", "REWINDS", "SPARSITY_TOLERANCE", "TICKET_FORMAT", "TICKET_METHODS", "TICKET_RETRAIN",
    "TICKET_VERSION", "TICKET_VERSIONS_READ",
    # which weights
    "full_mask", "mask_from_weights_nonzero", "prunable_names",
    # unstructured pruning and IMP levels
    "global_magnitude_prune", "imp_pruned_count", "imp_sparsity", "layerwise_magnitude_prune",
    "prune_to_sparsity", "random_prune",
    # channel and N:M patterns
    "ChannelGroup", "alive_filters", "alive_inputs", "channel_groups", "channel_prune", "complete_channel_mask",
    "derived_masks", "layerwise_channel_prune", "random_channel_prune", "nm_dense_layers", "nm_groups_fit",
    "nm_prune", "parse_nm", "random_nm_prune",
    # changing a model
    "MaskEnforcer", "apply_mask", "check_mask_fits", "mask_gradients",
    # statistics
    "filter_sparsity", "layer_sparsity", "mask_iou", "sparsity", "zero_kernels",
    # ticket files
    "load_ticket", "make_ticket", "save_ticket", "seed_round_from_sparsity", "ticket_family", "validate_ticket",
    # tickets that run faster (models/export.py)
    "SemiStructuredConv2d", "build_exported_model", "check_semi_structured_support", "export_channel_model",
    "load_exported", "to_semi_structured",
]
