"""A generated benchmark of sensor-like 1D signals (no download, fully reproducible).

``sensors``: windows of a 3-axis accelerometer-like sensor, 64 samples each,
8 activity classes. Every class is a periodic motion defined by fixed
parameters (drawn once from ``TEMPLATE_SEED``): a cadence, per-axis amplitudes
and phase offsets of the fundamental and of its second and third harmonics.
Classes come in pairs that share cadence and amplitudes and differ only in the
phase relations between axes and harmonics (the waveform's shape), so telling
them apart needs features of the pattern, not of its energy. Each window then
gets nuisances a real sensor has: a random start phase (the motion may begin
anywhere in the window), cadence jitter, amplitude jitter, a gravity offset per
axis, a slow drift, and white noise.

``sensors16`` is the harder variant: the same recipe with 16 classes (8 pairs), so
cadences lie closer together and cadence jitter confuses pairs with each other too.

Deterministic: the same (n, seed, classes) gives the same arrays on every machine; the
8-class benchmark is unchanged by the ``classes`` argument.
"""

from __future__ import annotations

import numpy as np

TEMPLATE_SEED = 20_240_918  # fixes the class definitions, not the samples
CLASSES = 8
CHANNELS = 3
LENGTH = 64
CLASS_NAMES = [f"activity-{k}" for k in range(CLASSES)]


def class_names(classes: int = CLASSES) -> list[str]:
    return [f"activity-{k}" for k in range(classes)]


def class_templates(classes: int = CLASSES) -> dict[str, np.ndarray]:
    """Per class: cadence (cycles per window), amplitudes and phases (K, harmonics, axes)."""
    if classes < 2 or classes % 2:
        raise ValueError(f"classes come in pairs: an even number >= 2, got {classes}")
    rng = np.random.default_rng(TEMPLATE_SEED)
    pairs = classes // 2
    cadence = np.repeat(rng.uniform(2.0, 6.0, size=pairs), 2)  # shared within a pair
    amp = np.repeat(rng.uniform(0.3, 1.0, size=(pairs, 3, CHANNELS)), 2, axis=0)
    amp[:, 1:] *= 0.6  # harmonics weaker than the fundamental
    phase = rng.uniform(0, 2 * np.pi, size=(classes, 3, CHANNELS))
    return {"cadence": cadence, "amplitude": amp, "phase": phase}


def make_sensor_signals(
    n: int, seed: int, noise: float = 0.6, classes: int = CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows with balanced labels over ``classes`` activities.

    Returns:
        x: float32 (n, 3, 1, 64) (channels, height 1, time); y: int64 (n,).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    t = np.arange(LENGTH) / LENGTH  # window time in [0, 1)
    tpl = class_templates(classes)
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    start = rng.uniform(0, 2 * np.pi, size=n)  # where in its cycle the motion starts
    cadence = tpl["cadence"][y] * rng.uniform(0.92, 1.08, size=n)
    scale = rng.uniform(0.8, 1.2, size=(n, 1, 1))
    x = np.zeros((n, CHANNELS, LENGTH))
    for h in range(3):
        arg = (h + 1) * (2 * np.pi * cadence[:, None] * t[None, :] + start[:, None])  # (n, L)
        amp = tpl["amplitude"][y, h][:, :, None]  # (n, axes, 1)
        ph = tpl["phase"][y, h][:, :, None]
        x += amp * np.sin(arg[:, None, :] + ph)
    x *= scale
    gravity = rng.normal(0, 0.5, size=(n, CHANNELS, 1))
    drift = rng.normal(0, 0.3, size=(n, CHANNELS, 1)) * t[None, None, :]
    x += gravity + drift + rng.normal(0, noise, size=x.shape)
    return x[:, :, None, :].astype(np.float32), y.astype(np.int64)
