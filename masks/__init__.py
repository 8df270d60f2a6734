"""Mask math and the ticket file: which weights are prunable (prunable), the unstructured, channel and
N:M patterns (unstructured, channel, nm, patterns), sparsity statistics (stats), applying and enforcing
masks on a model (enforce), the ticket file format (ticket), and LMP's learned masks: top-k of real-valued
scores with a straight-through gradient (learned).

May import utils/ only.  The public entry is ``pruning_utils``; the export of channel
tickets to smaller models lives beside the architectures, in ``models/export.py``.
"""
