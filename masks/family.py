"""The family a ticket's runs are grouped under, from its method, sparsity pattern and rewind. Torch-free (unlike
the rest of masks/), so the sweep's plan names a grid's run directories without loading torch."""


def ticket_family(method, pattern="unstructured", nm=None):
    """The name under which analysis and sweeps group a ticket's runs: its method, with the sparsity
    pattern appended when it is structured ("omp_channel", "imp_nm2of4"), so that channel and
    unstructured tickets of one method never share a curve or a verdict row."""
    if pattern in (None, "unstructured"):
        return method
    if pattern == "nm":
        return f"{method}_nm{nm[0]}of{nm[1]}" if nm else f"{method}_nm"
    return f"{method}_{pattern}"


def rewind_epoch(value):
    """K of an IMP rewind to epoch K of the first re-training round ("epoch_K", K >= 1), else None."""
    if isinstance(value, str) and value.startswith("epoch_") and value[6:].isdigit() and int(value[6:]) >= 1:
        return int(value[6:])
    return None
