"""Data loaders on tiny files written in each real format: CIFAR python batches (and the
refusal of anything in them but arrays), .npz archives, image folders, bundled digits."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from takfl.data import (
    DataError,
    TensorDataset,
    load_cifar,
    load_dataset,
    load_digits,
    load_image_folder,
    load_npz,
)

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def pixels(rows: int, seed: int) -> np.ndarray:
    """(rows, 3072) uint8, the CIFAR row layout (1024 red, 1024 green, 1024 blue)."""
    return np.random.default_rng(seed).integers(0, 256, size=(rows, 3072), dtype=np.uint8)


def keyed(entries: dict[str, Any], as_bytes: bool) -> dict[Any, Any]:
    """Keys (and string lists) as ``bytes``, like ``pickle.load(f, encoding='bytes')`` shows
    the original files, or as ``str``."""
    if not as_bytes:
        return entries
    out: dict[Any, Any] = {}
    for k, v in entries.items():
        if isinstance(v, list) and v and isinstance(v[0], str):
            v = [s.encode() for s in v]
        out[k.encode()] = v
    return out


def dump(path: Path, obj: object, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, as_bytes: bool, protocol: int) -> dict[str, np.ndarray]:
    """Five 3-row training batches, a 2-row test batch and batches.meta; returns what went in."""
    folder = root / "cifar-10-batches-py"
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = pixels(3, seed=i), [(i + j) % 10 for j in range(3)]
        batch = {"batch_label": f"training batch {i} of 5", "labels": y, "data": x}
        dump(folder / f"data_batch_{i}", keyed(batch, as_bytes), protocol)
        train_x.append(x)
        train_y += y
    test_x, test_y = pixels(2, seed=9), [9, 0]
    dump(folder / "test_batch", keyed({"labels": test_y, "data": test_x}, as_bytes), protocol)
    meta = {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 3, "num_vis": 3072}
    dump(folder / "batches.meta", keyed(meta, as_bytes), protocol)
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.asarray(train_y),
        "test_x": test_x,
        "test_y": np.asarray(test_y),
    }


def write_cifar100(root: Path, as_bytes: bool) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    train_x, train_y = pixels(4, seed=1), [0, 99, 42, 7]
    test_x, test_y = pixels(2, seed=2), [5, 98]
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        batch = {"fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x}
        dump(folder / name, keyed(batch, as_bytes), 2)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    dump(folder / "meta", keyed(meta, as_bytes), 2)
    return {"train_x": train_x, "train_y": np.asarray(train_y), "test_x": test_x}


def unnormalised(ds: TensorDataset) -> np.ndarray:
    """Undo the per-channel standardisation: back to images in [0, 1]."""
    mean = torch.tensor(ds.mean)[None, :, None, None]
    std = torch.tensor(ds.std)[None, :, None, None]
    return (ds.x * std + mean).numpy()


def as_images(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0


# --- CIFAR -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("as_bytes", "protocol"),
    [(True, 2), (False, 2), (False, 4), (True, 5)],
    ids=["bytes-keys-p2", "str-keys-p2", "str-keys-p4", "bytes-keys-p5"],
)
def test_cifar10_batches_load(tmp_path: Path, as_bytes: bool, protocol: int) -> None:
    written = write_cifar10(tmp_path, as_bytes, protocol)

    train = load_cifar(tmp_path, "cifar10", "train")
    test = load_cifar(tmp_path, "cifar10", "test")

    assert train.x.shape == (15, 3, 32, 32)
    assert train.x.dtype == torch.float32
    assert train.y.tolist() == written["train_y"].tolist()
    assert train.class_names == CIFAR10_NAMES
    np.testing.assert_allclose(unnormalised(train), as_images(written["train_x"]), atol=1e-4)
    assert test.y.tolist() == [9, 0]
    np.testing.assert_allclose(unnormalised(test), as_images(written["test_x"]), atol=1e-4)
    assert train.name == "cifar10-train"


def test_cifar_folder_may_be_given_directly(tmp_path: Path) -> None:
    write_cifar10(tmp_path, as_bytes=True, protocol=2)

    direct = load_cifar(tmp_path / "cifar-10-batches-py", "cifar10", "test")

    assert len(direct) == 2


def test_cifar10_batch_from_python2_numpy_loads(tmp_path: Path) -> None:
    """The published files name ``numpy.core.multiarray``, the module of older NumPy."""
    written = write_cifar10(tmp_path, as_bytes=True, protocol=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = path.read_bytes()
    old = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert old != raw
    path.write_bytes(old)

    test = load_cifar(tmp_path, "cifar10", "test")

    np.testing.assert_allclose(unnormalised(test), as_images(written["test_x"]), atol=1e-4)


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes-keys", "str-keys"])
def test_cifar100_layout_loads_fine_labels(tmp_path: Path, as_bytes: bool) -> None:
    written = write_cifar100(tmp_path, as_bytes)

    train = load_cifar(tmp_path, "cifar100", "train")
    test = load_cifar(tmp_path, "cifar100", "test")

    assert train.x.shape == (4, 3, 32, 32)
    assert train.y.tolist() == [0, 99, 42, 7]
    assert train.num_classes == 100
    assert train.class_names[42] == "fine42"
    np.testing.assert_allclose(unnormalised(train), as_images(written["train_x"]), atol=1e-4)
    assert test.y.tolist() == [5, 98]


def test_cifar_without_meta_numbers_the_classes(tmp_path: Path) -> None:
    write_cifar10(tmp_path, as_bytes=False, protocol=4)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()

    ds = load_cifar(tmp_path / "cifar-10-batches-py", "cifar10", "test")

    assert ds.class_names == [str(i) for i in range(10)]


class _CallsOnLoad:
    """Pickles as a call of ``func(*args)``: what a crafted file would use to run code."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (_CallsOnLoad(print, "payload ran"), r"(builtins|__builtin__)\.print"),
        (_CallsOnLoad(os.getcwd), re.escape(f"{os.getcwd.__module__}.getcwd")),
    ],
    ids=["print", "getcwd"],
)
def test_crafted_cifar_batch_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: object, refused: str
) -> None:
    write_cifar10(tmp_path, as_bytes=False, protocol=2)
    batch = {"data": pixels(2, seed=0), "labels": [0, 1], "extra": payload}
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", batch, 2)

    with pytest.raises(DataError, match=f"refusing to load {refused}"):
        load_cifar(tmp_path, "cifar10", "test")

    assert "payload ran" not in capsys.readouterr().out


def test_crafted_meta_file_is_refused_too(tmp_path: Path) -> None:
    write_cifar10(tmp_path, as_bytes=False, protocol=2)
    meta = {"label_names": _CallsOnLoad(print, "payload ran")}
    dump(tmp_path / "cifar-10-batches-py" / "batches.meta", meta, 2)

    with pytest.raises(DataError, match=r"refusing to load (builtins|__builtin__)\.print"):
        load_cifar(tmp_path, "cifar10", "test")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (pickle.dumps([1, 2, 3]), "not a dict"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)})[:40], "not a readable"),
        (b"not a pickle at all", "not a readable"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}), "needs 'data' and 'labels'"),
        (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "3072"),
    ],
    ids=["list", "truncated", "garbage", "no-labels", "wrong-row-size"],
)
def test_malformed_cifar_batch(tmp_path: Path, content: bytes, fragment: str) -> None:
    write_cifar10(tmp_path, as_bytes=False, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)

    with pytest.raises(DataError, match=fragment):
        load_cifar(tmp_path, "cifar10", "test")


def test_missing_cifar_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing CIFAR batch .*data_batch_1"):
        load_cifar(tmp_path, "cifar10", "train")
    write_cifar10(tmp_path, as_bytes=False, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4; download and unpack the python version"):
        load_cifar(tmp_path, "cifar10", "train")
    with pytest.raises(DataError, match="use cifar10 or cifar100"):
        load_cifar(tmp_path, "cifar1000", "train")
    with pytest.raises(DataError, match="use train or test"):
        load_cifar(tmp_path, "cifar10", "validation")


# --- .npz ------------------------------------------------------------------------------


def test_npz_with_uint8_images_and_class_names(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(6, 5, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "shapes.npz", x=x, y=y, class_names=np.array(["a", "b", "c"]))

    ds = load_npz(tmp_path / "shapes.npz")

    assert ds.x.shape == (6, 1, 5, 5)  # (N, H, W) gets a channel axis
    assert ds.y.tolist() == y.tolist()
    assert ds.class_names == ["a", "b", "c"]
    assert ds.name == "shapes"
    np.testing.assert_allclose(unnormalised(ds)[:, 0], x / 255.0, atol=1e-5)


def test_npz_float_images_are_kept_in_scale(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((4, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 3, 1, 2]))

    ds = load_npz(tmp_path / "f.npz")

    assert ds.class_names == ["0", "1", "2", "3"]
    np.testing.assert_allclose(unnormalised(ds), x, atol=1e-5)


def test_normalised_channels_have_zero_mean_unit_std(tmp_path: Path) -> None:
    x = np.random.default_rng(2).integers(0, 256, size=(20, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "n.npz", x=x, y=np.arange(20) % 2)

    ds = load_npz(tmp_path / "n.npz")

    torch.testing.assert_close(ds.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ds.x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"images": np.zeros((2, 4, 4)), "y": np.array([0, 1])}, r"'x' and 'y' \(has \['images'"),
        ({"x": np.zeros((2, 4, 4))}, "must contain arrays 'x' and 'y'"),
        ({"x": np.zeros((2, 16)), "y": np.array([0, 1])}, "'x' must be"),
        ({"x": np.zeros((2, 4, 4)), "y": np.array([0.5, 1.0])}, "integer label array"),
        ({"x": np.zeros((0, 4, 4)), "y": np.array([], dtype=np.int64)}, "non-empty"),
        (
            {"x": np.zeros((2, 4, 4)), "y": np.array([0, 5]), "class_names": np.array(["a"])},
            r"labels must lie in \[0, 1\)",
        ),
        ({"x": np.zeros((3, 4, 4)), "y": np.array([0, 1])}, "3 images but labels"),
        ({"x": np.array([None, 1], dtype=object), "y": np.array([0, 1])}, "plain arrays"),
    ],
    ids=[
        "no-x",
        "no-y",
        "flat-x",
        "float-labels",
        "empty",
        "label-out-of-range",
        "length-mismatch",
        "object-array",
    ],
)
def test_bad_npz_is_explained(tmp_path: Path, arrays: dict[str, Any], fragment: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)

    with pytest.raises(DataError, match=fragment):
        load_npz(path)


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "fake.npz").write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(tmp_path / "fake.npz")
    with pytest.raises(DataError, match=r"no such \.npz file"):
        load_npz(tmp_path / "absent.npz")


# --- image folders ---------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value,) * len(mode)).save(path)


def test_image_folder_loads_classes_in_name_order(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    write_image(root / "dog" / "a.png", (20, 10), "RGB", 200)
    write_image(root / "dog" / "b.jpg", (8, 8), "L", 50)
    write_image(root / "cat" / "c.png", (16, 16), "RGBA", 100)
    (root / "cat" / "notes.txt").write_text("not an image")

    ds = load_image_folder(root, size=(12, 12))

    assert ds.class_names == ["cat", "dog"]
    assert ds.x.shape == (3, 3, 12, 12)  # grey and RGBA images become RGB
    assert ds.y.tolist() == [0, 1, 1]
    assert ds.name == "pets"
    restored = unnormalised(ds)
    np.testing.assert_allclose(restored[0], 100 / 255.0, atol=1e-4)
    np.testing.assert_allclose(restored[1], 200 / 255.0, atol=1e-4)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such image folder"):
        load_image_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "x.txt").write_text("text")
    with pytest.raises(DataError, match="no images found in cat"):
        load_image_folder(tmp_path / "noimg")


# --- digits, dispatch, the dataset type -----------------------------------------------------


def test_digits_are_the_real_bundled_images() -> None:
    ds = load_digits()

    assert len(ds) == 1797
    assert ds.input_shape == (1, 8, 8)
    assert ds.num_classes == 10
    assert ds.y.dtype == torch.int64
    assert abs(float(ds.x.mean())) < 1e-4
    assert float(ds.x.std()) == pytest.approx(1.0, abs=1e-3)


def test_load_dataset_dispatches_by_name(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 4, 4), np.uint8), y=np.array([0, 1]))
    write_cifar100(tmp_path, as_bytes=True)

    assert len(load_dataset("digits")) == 1797
    assert len(load_dataset("npz", tmp_path / "d.npz")) == 2
    assert len(load_dataset("cifar100", tmp_path, "test")) == 2


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("cifar10", "needs --data-dir"),
        ("npz", "data_dir set to the .npz file"),
        ("imagefolder", "data_dir set to the root folder"),
        ("mnist", "unknown data set 'mnist'"),
    ],
)
def test_load_dataset_errors(name: str, fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        load_dataset(name)


def test_subset_keeps_metadata() -> None:
    ds = TensorDataset(
        x=torch.arange(24, dtype=torch.float32).reshape(6, 1, 2, 2),
        y=torch.tensor([0, 1, 0, 1, 0, 1]),
        class_names=["even", "odd"],
        mean=[0.5],
        std=[2.0],
        name="toy",
    )

    sub = ds.subset(np.array([5, 0]))

    assert sub.y.tolist() == [1, 0]
    assert torch.equal(sub.x[0], ds.x[5])
    assert (sub.class_names, sub.mean, sub.std, sub.name) == (["even", "odd"], [0.5], [2.0], "toy")


def test_tensor_dataset_checks_shapes() -> None:
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        TensorDataset(
            x=torch.zeros(4, 8, 8), y=torch.zeros(4, dtype=torch.int64), class_names=["a"]
        )
    with pytest.raises(DataError, match="4 images but labels"):
        TensorDataset(
            x=torch.zeros(4, 1, 8, 8), y=torch.zeros(3, dtype=torch.int64), class_names=["a"]
        )
