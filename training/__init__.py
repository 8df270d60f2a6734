"""The training layer both stages share: the engine (train_epoch / evaluate), the one resumable run
loop, the set-up of data, models and precision, LMP's learning of masks, and the chance-level check of a
selected model.

It sits above data_loading/dataset, models, masks/pruning_utils and attacks, and may import them and
utils/; the entry scripts (main_*.py) import it, never the other way round.
"""
