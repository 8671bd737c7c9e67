"""Data sets held as tensors: digits (bundled), generated sensor signals, CIFAR python
batches, .npz, image folders.

Every loader returns a :class:`TensorDataset` with inputs as float32
(N, C, H, W), already normalised, and integer labels (N,). 1D signals (N, C, L)
travel as (N, C, 1, L): height 1, so one layout serves images and signals.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch


class DataError(ValueError):
    """A data set is missing, malformed or inconsistent; the message says what to fix."""


@dataclass(kw_only=True)
class TensorDataset:
    """Images x: float32 (N, C, H, W), normalised; labels y: int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    mean: list[float] = field(default_factory=list)  # per-channel, applied already
    std: list[float] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be (N, C, H, W), got {tuple(self.x.shape)}")
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray | Sequence[int]) -> TensorDataset:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorDataset(
            x=self.x[idx],
            y=self.y[idx],
            class_names=self.class_names,
            mean=self.mean,
            std=self.std,
            name=self.name,
        )


def normalise(images: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """Per-channel standardisation of float images (N, C, H, W) -> same shape, mean, std."""
    mean = images.mean(axis=(0, 2, 3))
    std = images.std(axis=(0, 2, 3)) + 1e-8
    out = (images - mean[None, :, None, None]) / std[None, :, None, None]
    return out.astype(np.float32), mean.tolist(), std.tolist()


def _from_arrays(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], name: str
) -> TensorDataset:
    x, mean, std = normalise(images.astype(np.float32))
    return TensorDataset(
        x=torch.from_numpy(x),
        y=torch.from_numpy(labels.astype(np.int64)),
        class_names=class_names,
        mean=mean,
        std=std,
        name=name,
    )


def load_digits() -> TensorDataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, 10 classes."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    bunch = sk_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8)
    return _from_arrays(images, bunch.target, [str(i) for i in range(10)], "digits")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches that builds only NumPy arrays and builtins.

    The batches are pickles by definition of the format; this refuses any class
    other than what NumPy needs to rebuild an array, so a crafted file cannot
    run code.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _text(value: object) -> str:
    """A key or class name from a batch: ``bytes`` (files written with bytes keys) or ``str``."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _read_cifar_batch(path: Path) -> dict[str, object]:
    """One CIFAR python batch as a dict with ``str`` keys; refuses anything but arrays."""
    if not path.is_file():
        raise DataError(f"missing CIFAR batch {path}; download and unpack the python version")
    with path.open("rb") as f:
        try:
            data = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        except DataError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{path} is not a readable CIFAR python batch ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a CIFAR python batch (not a dict)")
    return {_text(k): v for k, v in data.items()}


def load_cifar(
    data_dir: str | Path, variant: str = "cifar10", split: str = "train"
) -> TensorDataset:
    """CIFAR-10/100 from the standard python batches.

    ``data_dir`` holds ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or is that folder).
    """
    root = Path(data_dir)
    if split not in ("train", "test"):
        raise DataError(f"unknown CIFAR split {split!r}; use train or test")
    if variant == "cifar10":
        subdir = "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    elif variant == "cifar100":
        subdir = "cifar-100-python"
        files = [split]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    else:
        raise DataError(f"unknown CIFAR variant {variant!r}; use cifar10 or cifar100")
    is_folder = (root / meta_file).is_file() or (root / files[0]).is_file()
    folder = root if is_folder else root / subdir
    images, labels = [], []
    for name in files:
        batch = _read_cifar_batch(folder / name)
        if "data" not in batch or label_key not in batch:
            raise DataError(
                f"{folder / name} is not a {variant} batch: it needs 'data' and '{label_key}' "
                f"entries (has {sorted(batch)})"
            )
        arr = np.asarray(batch["data"], dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072:
            raise DataError(f"{folder / name}: expected rows of 3072 bytes, got {arr.shape}")
        images.append(arr.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    meta = _read_cifar_batch(folder / meta_file) if (folder / meta_file).exists() else {}
    n_classes = 10 if variant == "cifar10" else 100
    names_obj = meta.get(names_key)
    names = (
        [_text(n) for n in names_obj]
        if isinstance(names_obj, list)
        else [str(i) for i in range(n_classes)]
    )
    x = np.concatenate(images).astype(np.float32) / 255.0
    return _from_arrays(x, np.concatenate(labels), names, f"{variant}-{split}")


SENSORS_TRAIN_SIZE = 2400  # windows in the generated ``sensors`` train split
SENSORS_TEST_SIZE = 1000
SENSORS16_TRAIN_SIZE = 4800  # ``sensors16``: 16 classes, the same windows per class
SENSORS16_TEST_SIZE = 1600


def load_sensors(split: str = "train", classes: int = 8) -> TensorDataset:
    """The generated sensor-signal benchmark (:mod:`takfl.data.signals`): 3 x 1 x 64,
    8 classes (``sensors``) or 16 (``sensors16``); train and test splits come from
    different seeds."""
    from takfl.data.signals import class_names, make_sensor_signals

    if split not in ("train", "test"):
        raise DataError(f"unknown sensors split {split!r}; use train or test")
    sizes = {
        8: (SENSORS_TRAIN_SIZE, SENSORS_TEST_SIZE),
        16: (SENSORS16_TRAIN_SIZE, SENSORS16_TEST_SIZE),
    }
    if classes not in sizes:
        raise DataError(f"the sensors benchmark has 8 or 16 classes, not {classes}")
    train, test = sizes[classes]
    n, seed = (train, 0) if split == "train" else (test, 1)
    x, y = make_sensor_signals(n, seed, classes=classes)
    name = "sensors" if classes == 8 else f"sensors{classes}"
    return _from_arrays(x, y, class_names(classes), f"{name}-{split}")


def _npz_layout(x: np.ndarray, layout: str, p: Path) -> np.ndarray:
    """Images (N, C, H, W) or (N, H, W); signals (N, C, L) or (N, L) -> (N, C, 1, L)."""
    if layout == "signals":
        if x.ndim == 2:
            x = x[:, None]
        if x.ndim != 3:
            raise DataError(f"{p}: signals 'x' must be (N, C, L) or (N, L), got {x.shape}")
        return x[:, :, None, :]
    if layout != "images":
        raise DataError(f"unknown npz layout {layout!r}; use images or signals")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{p}: 'x' must be (N, C, H, W) or (N, H, W) images, got {x.shape} "
            "(for (N, C, L) signals set data.layout: signals)"
        )
    return x


def load_npz(path: str | Path, layout: str = "images") -> TensorDataset:
    """A .npz with ``x`` and ``y`` (N,) labels. ``layout`` images: ``x`` (N, C, H, W) or
    (N, H, W); signals: ``x`` (N, C, L) or (N, L), returned as (N, C, 1, L).

    Optional ``class_names`` (string array). Inputs in integers are scaled by 1/255.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such .npz file: {p}")
    try:
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{p} must contain arrays 'x' and 'y' (has {sorted(f.files)})")
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
            names = [str(n) for n in f["class_names"]] if "class_names" in f else None
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # not an archive, or object arrays
        raise DataError(f"{p} is not a readable .npz of plain arrays ({e})") from e
    x = _npz_layout(x, layout, p)
    x = x.astype(np.float32) / (255.0 if np.issubdtype(x.dtype, np.integer) else 1.0)
    if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{p}: 'y' must be a non-empty (N,) integer label array, got {y.dtype} {y.shape}"
        )
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1)]
    if y.min() < 0 or y.max() >= len(names):
        raise DataError(f"{p}: labels must lie in [0, {len(names)}), got {y.min()}..{y.max()}")
    return _from_arrays(x, y, names, p.stem)


def load_image_folder(path: str | Path, size: tuple[int, int] = (32, 32)) -> TensorDataset:
    """``root/<class name>/<image>``: every image resized to ``size``, RGB."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("image folders need Pillow: pip install pillow") from e
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"no such image folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}:
                continue
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB").resize(size), dtype=np.float32) / 255.0
            images.append(arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images found in {', '.join(classes)}")
    return _from_arrays(np.stack(images), np.asarray(labels), classes, root.name)


def load_dataset(
    name: str, data_dir: str | Path | None = None, split: str = "train", layout: str = "images"
) -> TensorDataset:
    """Load by name: ``digits``, ``sensors`` and ``sensors16`` (generated), ``cifar10``,
    ``cifar100``, ``npz`` (data_dir is the file; ``layout`` images or signals),
    ``imagefolder`` (data_dir is the root)."""
    if name == "digits":
        return load_digits()
    if name == "sensors":
        return load_sensors(split)
    if name == "sensors16":
        return load_sensors(split, classes=16)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir pointing at the python batches")
        return load_cifar(data_dir, name, split)
    if name == "npz":
        if data_dir is None:
            raise DataError("npz needs data_dir set to the .npz file")
        return load_npz(data_dir, layout)
    if name == "imagefolder":
        if data_dir is None:
            raise DataError("imagefolder needs data_dir set to the root folder")
        return load_image_folder(data_dir)
    raise DataError(
        f"unknown data set {name!r}; use digits, sensors, sensors16, cifar10, cifar100, npz "
        "or imagefolder"
    )
