"""Independent random streams for the data pipeline, each seeded by a mix of plain integers."""

import numpy as np

# Seed-mixing stream ids, so the data order, the augmentation draws and the subset draw never
# share a stream.
STREAM_ORDER = 1
STREAM_AUGMENT = 2
STREAM_SUBSET = 3


def mix_seed(*parts) -> int:
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & ((1 << 63) - 1)
