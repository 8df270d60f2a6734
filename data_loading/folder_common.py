"""What both image-folder paths (PIL and uint8) share: reaching the ImageFolder under Subsets, and
the report of a file that fails to decode."""

from dataclasses import dataclass


def unwrap_subset(dataset, index: int):
    """The innermost dataset under (possibly nested) Subsets, and ``index`` mapped into it."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset, int(index)


def is_image_folder(dataset) -> bool:
    return hasattr(dataset, "samples") and hasattr(dataset, "loader")


@dataclass
class BadImage:
    """A file that failed to decode, returned by a worker instead of raising: an exception raised
    in a DataLoader worker reaches the main process wrapped in a multi-line traceback."""

    path: str
    problem: str

    @classmethod
    def of(cls, path, exc: BaseException):
        return cls(str(path), " ".join(f"{type(exc).__name__}: {exc}".split())[:300])

    def message(self, what: str = "") -> str:
        where = f"{what} image" if what else "image"
        return (f"{where} {self.path} cannot be decoded ({self.problem}); replace it with a good copy "
                "or remove it from the folder.")
