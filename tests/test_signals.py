"""1D signals: the generated sensors benchmark, (N, C, L) arrays in .npz files, and the
bundled sensors federation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from takfl.config import load_federation, prototype_model
from takfl.data import DataError, load_dataset, load_npz
from takfl.data.signals import CLASSES, class_templates, make_sensor_signals
from takfl.federation_data import build_federation_data
from takfl.models import build_model, count_parameters


def test_generator_is_deterministic_balanced_and_seeded() -> None:
    x1, y1 = make_sensor_signals(80, seed=3)
    x2, y2 = make_sensor_signals(80, seed=3)
    x3, _ = make_sensor_signals(80, seed=4)
    assert x1.shape == (80, 3, 1, 64) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert np.bincount(y1, minlength=CLASSES).tolist() == [10] * CLASSES


def _spectra(x: np.ndarray, cross: bool) -> np.ndarray:
    """Shift-invariant features: per-axis amplitude spectra, plus cross-axis spectra."""
    f = np.fft.rfft(x[:, :, 0, :], axis=2)[:, :, 1:20]
    out = [np.abs(f).reshape(len(x), -1)]
    if cross:
        for a, b in ((0, 1), (0, 2), (1, 2)):
            c = f[:, a] * np.conj(f[:, b])
            out += [c.real, c.imag]
    return np.concatenate(out, 1)


@pytest.mark.slow
def test_classes_differ_in_waveform_shape_not_in_energy() -> None:
    """The structure is real and as documented: amplitude spectra cannot tell the pairs
    apart; the phase relations between axes can."""
    x, y = make_sensor_signals(1200, 0)
    xt, yt = make_sensor_signals(600, 1)
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for cross in (False, True):
            clf = LogisticRegression(max_iter=300).fit(_spectra(x, cross), y)
            scores[cross] = clf.score(_spectra(xt, cross), yt)
    assert scores[False] < 0.65  # pairs share cadence and amplitudes
    assert scores[True] > 0.9


def test_npz_signals_load_as_height_one(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 2, 30)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(6) % 3)
    ds = load_npz(tmp_path / "s.npz", layout="signals")
    assert ds.x.shape == (6, 2, 1, 30)
    assert ds.input_shape == (2, 1, 30)
    np.savez(tmp_path / "mono.npz", x=x[:, 0], y=np.arange(6) % 3)
    assert load_npz(tmp_path / "mono.npz", layout="signals").x.shape == (6, 1, 1, 30)
    # the same (N, C, L) array read as images is refused with the fix in the message
    np.savez(tmp_path / "bad.npz", x=x[:, :, :, None, None], y=np.arange(6) % 3)
    with pytest.raises(DataError, match="layout: signals"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match=r"\(N, C, L\)"):
        load_npz(tmp_path / "bad.npz", layout="signals")


def test_sensors_data_set_and_federation() -> None:
    train, test = load_dataset("sensors"), load_dataset("sensors", split="test")
    assert train.input_shape == (3, 1, 64) and train.num_classes == CLASSES
    assert len(train) == 2400 and len(test) == 1000
    cfg = load_federation("sensors")
    data = build_federation_data(cfg, 0)
    assert len(data.public_x) == 600 and len(data.val_x) == 150 and len(data.test_x) == 1000
    sizes = {
        p.name: count_parameters(
            build_model(
                prototype_model(cfg, p.name).builder,
                8,
                (3, 1, 64),
                **prototype_model(cfg, p.name).args,
            )
        )
        for p in cfg.prototypes
    }
    assert sizes["L"] > 15 * sizes["S"]


def test_sensors16_is_the_same_recipe_with_sixteen_classes() -> None:
    x, y = make_sensor_signals(160, seed=3, classes=16)
    again, _ = make_sensor_signals(160, seed=3, classes=16)
    np.testing.assert_array_equal(x, again)
    assert np.bincount(y, minlength=16).tolist() == [10] * 16
    eight = class_templates()  # the 8-class benchmark does not move with the argument
    for key, value in class_templates(8).items():
        np.testing.assert_array_equal(value, eight[key])
    assert len(set(class_templates(16)["cadence"].round(6))) == 8  # classes still in pairs
    with pytest.raises(ValueError, match="pairs"):
        class_templates(7)
    train = load_dataset("sensors16")
    assert train.num_classes == 16 and len(train) == 4800
    assert len(load_dataset("sensors16", split="test")) == 1600
    cfg = load_federation("sensors16")
    data = build_federation_data(cfg, 0)
    assert len(data.public_x) == 1000 and len(data.val_x) == 200 and len(data.test_x) == 1600
    sizes = {
        p.name: count_parameters(
            build_model(
                prototype_model(cfg, p.name).builder,
                16,
                (3, 1, 64),
                **prototype_model(cfg, p.name).args,
            )
        )
        for p in cfg.prototypes
    }
    assert sizes["L"] > 30 * sizes["S"]  # a larger gap than sensors' (15x)
