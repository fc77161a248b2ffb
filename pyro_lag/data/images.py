"""Grayscale image arrays (.npz/.npy) and batches of binary images with dynamic binarisation.

Images are kept as loaded (uint8 0..255 or float32 in [0, 1]) and turned into float
[B, 1, H, W] batches on the fly. Dynamic binarisation draws each pixel from
Bernoulli(intensity) afresh every epoch, as in the OMNIGLOT experiments of the paper;
a fixed binarisation (drawn once from a seed) suits validation and test sets.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .batching import (
    BINARIZE,
    FIXED,
    BatchSource,
    DataFileError,
    as_tuple,
    check_positive,
    epoch_permutation,
    heldout_split,
    torch_generator,
)

__all__ = ["load_images", "split_images", "ImageBatches"]

BINARIZE_MODES = ("dynamic", "fixed", "none")


def _open_array(path: Path, key: str | None) -> np.ndarray:
    """The array stored in a .npy file, or under ``key`` in a .npz file (no pickles)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataFileError(f"data file is a directory, not a file: {path}") from None
    except PermissionError as err:
        raise DataFileError(f"cannot read data file {path}: {err.strerror}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        if path.is_file() and path.stat().st_size == 0:
            raise DataFileError(f"data file is empty: {path}") from None
        raise DataFileError(f"not a NumPy .npy/.npz file (or it holds pickled objects): {path}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.files)
            if not names:
                raise DataFileError(f"npz file holds no arrays: {path}")
            if key is None:
                if len(names) != 1:
                    raise DataFileError(f"npz file holds arrays {', '.join(names)}; choose one with key: {path}")
                key = names[0]
            if key not in names:
                raise DataFileError(f"npz file has no array {key!r} (it has {', '.join(names)}): {path}")
            try:
                return loaded[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile):
                raise DataFileError(f"array {key!r} cannot be read (corrupt or pickled): {path}") from None
    if key is not None:
        raise DataFileError(f"key={key!r} given but a .npy file holds a single array: {path}")
    return loaded


def load_images(
    path: str | os.PathLike, key: str | None = None, *, image_size: tuple[int, int] | None = (28, 28)
) -> np.ndarray:
    """Load grayscale images as an [N, H, W] array: uint8 (0..255) or float32 (in [0, 1]).

    Accepts [N, H, W] or [N, 1, H, W]; ``image_size=(H, W)`` is enforced unless None.
    Integer arrays must lie in 0..255, float arrays in [0, 1]; anything else raises
    ``DataFileError`` with a one-line message naming the file.
    """
    path = Path(path)
    array = _open_array(path, key)
    what = f"{path}" if key is None else f"{path} [{key}]"
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise DataFileError(f"images must be N x H x W or N x 1 x H x W, got shape {tuple(array.shape)}: {what}")
    if image_size is not None and tuple(array.shape[1:]) != tuple(image_size):
        raise DataFileError(
            f"images must be {image_size[0]} x {image_size[1]}, got shape {tuple(array.shape)}: {what}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise DataFileError(f"image array is empty, shape {tuple(array.shape)}: {what}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise DataFileError(f"integer pixel values must lie in 0..255, got {lo}..{hi}: {what}")
        return array.astype(np.uint8, copy=False)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataFileError(f"pixel values must be finite, found NaN or infinity: {what}")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise DataFileError(f"float pixel values must lie in [0, 1], got {low:g}..{high:g}: {what}")
        return array.astype(np.float32, copy=False)
    raise DataFileError(f"pixel values must be integers or floats, got dtype {array.dtype}: {what}")


def split_images(images: np.ndarray, n_heldout: int, *, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)``: the last ``n_heldout`` images held out, or a seeded random subset."""
    kept, held = heldout_split(len(images), n_heldout, seed=seed)
    return images[kept], images[held]


def intensities(images: np.ndarray) -> torch.Tensor:
    """Float32 [B, 1, H, W] intensities in [0, 1] of uint8 or float images [B, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.unsqueeze(1)


class ImageBatches(BatchSource):
    """Batches ``(x,)`` with ``x`` a FloatTensor [B, 1, H, W] of (binarised) images.

    ``binarize``: ``"dynamic"`` draws Bernoulli(intensity) pixels afresh each epoch (from
    ``(seed, epoch, position)``, so resuming mid-epoch gives the same pixels);
    ``"fixed"`` binarises the whole set once from ``seed`` (for validation/test);
    ``"none"`` yields the intensities. Examples are shuffled every epoch unless
    ``shuffle=False``; the last batch may be smaller unless ``drop_last``.
    """

    def __init__(
        self,
        images: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        binarize: str = "dynamic",
        shuffle: bool = True,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ):
        super().__init__(seed=seed, shuffle=shuffle, device=device)
        if binarize not in BINARIZE_MODES:
            raise ValueError(f"binarize must be one of {', '.join(BINARIZE_MODES)}, got {binarize!r}")
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3 or len(images) == 0:
            raise ValueError(f"images must be a non-empty N x H x W array, got shape {images.shape}")
        self.batch_size = check_positive(batch_size, "batch_size")
        self.binarize = binarize
        self.drop_last = bool(drop_last)
        if binarize == "fixed":
            probs = intensities(images)[:, 0]
            drawn = torch.bernoulli(probs, generator=torch_generator(self.seed, FIXED))
            images = drawn.to(torch.uint8).numpy() * np.uint8(255)
        self.images = images
        n = len(images)
        self._len = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self._len == 0:
            raise ValueError(f"batch_size={self.batch_size} with drop_last leaves no batch of {n} images")

    def __len__(self) -> int:
        return self._len

    @property
    def num_examples(self) -> int:
        return self._len * self.batch_size if self.drop_last else len(self.images)

    def _plan(self, epoch: int) -> np.ndarray:
        n = len(self.images)
        return epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)

    def _finish(self, index: np.ndarray, generator: torch.Generator | None) -> tuple[torch.Tensor]:
        x = intensities(self.images[index])
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return (x,)

    def _batch(self, plan: np.ndarray, epoch: int, position: int) -> tuple[torch.Tensor]:
        index = plan[position * self.batch_size : (position + 1) * self.batch_size]
        generator = torch_generator(self.seed, BINARIZE, epoch, position) if self.binarize == "dynamic" else None
        return self._finish(index, generator)

    def _sample(self, generator: torch.Generator) -> tuple[torch.Tensor]:
        n = len(self.images)
        index = torch.randperm(n, generator=generator)[: min(self.batch_size, n)].numpy()
        return self._finish(index, generator)

    def normalizer(self, batch) -> float:
        """Examples in the batch."""
        return float(as_tuple(batch)[0].shape[0])
