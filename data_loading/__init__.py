"""The data pipeline under ``dataset.py`` (the public entry, ``build_data``), one concept a module:

- catalog: the dataset names and their fixed facts (statistics, native size, class count)
- safe_unpickle: the restricted unpickler CIFAR's pickled batches are read with
- readers: each on-disk format (CIFAR batches, SVHN .mat, scikit-learn digits, ImageFolder trees)
- splits: the validation hold-out and the data-limited training subsets
- augment: the augmentation choice, batched augmentation of image tensors, folder transforms
- batching: the epoch plan both loaders share (steps, rank shares, evaluation shards, order)
- streams: the independent random streams of order, augmentation and subset draws
- tensor_loader: array datasets held on the training device
- folder_loader: image folders streamed from disk through a DataLoader
- folder_common: what the image-folder paths share (Subset unwrapping, the bad-file report)
- folder_uint8: the uint8 image-folder path (decode, crop, resize and flip at uint8 in the workers)
- folder_nvjpeg: its GPU-decode variant (nvJPEG in the training process)

It may import utils/ (and third-party libraries) only, nothing else of the project.
"""
