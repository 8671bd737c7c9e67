"""The model the service answers with, and its atomic replacement.

A request takes the holder's current :class:`ServedModel` once and finishes on it; a
swap only changes which model the *next* request takes, so nothing in flight fails or
is dropped when a release installs. The old model is freed when its last request ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from takfl.release.metadata import Release


class Runner(Protocol):
    """A loaded artifact (``export.runtimes.Runner``): (N, C, H, W) float32 -> (N, K)."""

    runtime: str

    def run(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ServedModel:
    """A loaded release. ``predict`` runs one request at a time on it: runtimes' sessions
    are not all safe to call from several threads (LiteRT's interpreter is not), and the
    runner already uses the profile's thread count for each call."""

    runner: Runner
    release: Release
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> int:
        return self.release.version

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel, as the model was trained (identity without stats).
        ``x``: (N, C, H, W) float32 scaled as the training loader scales raw data."""
        spec = self.release.spec
        if not spec.mean:
            return x
        mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
        return ((x - mean) / std).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, K) of normalised inputs (N, C, H, W)."""
        with self._lock:
            return np.asarray(self.runner.run(x), dtype=np.float32)

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers: the release and how it runs here."""
        spec = self.release.spec
        return {
            "version": self.release.version,
            "reinstates": self.release.reinstates,
            "prototype": spec.prototype,
            "round": spec.round,
            "runtime": self.runner.runtime,
            "format": spec.format,
            "quantization": spec.quantization,
            "builder": spec.builder,
            "input_shape": list(spec.input_shape),
            "num_classes": spec.num_classes,
            "class_names": list(spec.class_names),
            "model_sha256": self.release.model.sha256,
            "expires": self.release.expires.isoformat(),
        }


class ModelHolder:
    """The model being served (None until a release is installed). Thread-safe."""

    def __init__(self, model: ServedModel | None = None) -> None:
        self._lock = threading.Lock()
        self._model = model

    def get(self) -> ServedModel | None:
        with self._lock:
            return self._model

    def swap(self, model: ServedModel) -> ServedModel | None:
        """Serve ``model`` from the next request on; returns the one it replaces."""
        with self._lock:
            old, self._model = self._model, model
        return old

    @property
    def version(self) -> int | None:
        model = self.get()
        return None if model is None else model.version
