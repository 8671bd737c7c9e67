"""What an agent keeps between updates for its codecs: the error-feedback residual of
what it did not send, and the last global models it received (a downstream delta is
applied to one of them).

With a folder (``run --state-dir``) both survive a restart: ``residual.safetensors``
(float32, with the run and prototype it belongs to in its metadata) and
``models/<digest>.safetensors`` (each model's fp32 encoding, whose SHA-256 is its name,
checked on every read). Without one they live in memory only. Every file is written
atomically; one that is unreadable, of another run or prototype, or whose hash is not its
name is dropped with a log line, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from takfl.files import atomic_write_bytes
from takfl.state import State, StateView
from takfl.wire.codec import decode_state
from takfl.wire.downlink import full_blob
from takfl.wire.errors import WireError

log = logging.getLogger(__name__)

RESIDUAL_FILE = "residual.safetensors"
MODELS_DIR = "models"
KEEP_MODELS = 3  # the newest global models kept: a delta may be against any of them


class CodecState:
    """An agent's codec state, in ``folder`` (None: memory only). Thread-safe."""

    def __init__(self, folder: Path | None = None, *, keep_models: int = KEEP_MODELS) -> None:
        self.folder = folder
        self.keep_models = keep_models
        self._lock = threading.Lock()
        self._residual: tuple[str, str, State] | None = None  # (run, prototype, residual)
        self._models: OrderedDict[str, bytes] = OrderedDict()  # digest -> fp32 blob
        if folder is not None:
            (folder / MODELS_DIR).mkdir(parents=True, exist_ok=True)
            self._load_models(folder / MODELS_DIR)

    # -- the residual ---------------------------------------------------------------------
    def residual(self, run: str, prototype: str) -> State | None:
        """The residual to add to the next update of ``prototype`` in ``run``; None (the
        stored one dropped, with a log line) when it belongs to another run or prototype."""
        with self._lock:
            if self._residual is None and self.folder is not None:
                self._residual = self._read_residual()
            if self._residual is None:
                return None
            kept_run, kept_proto, residual = self._residual
            if (kept_run, kept_proto) != (run, prototype):
                log.info(
                    "error-feedback residual of run %s (%s) dropped: now run %s (%s)",
                    kept_run or "-",
                    kept_proto,
                    run or "-",
                    prototype,
                )
                self._residual = None
                self._remove(RESIDUAL_FILE)
                return None
            return residual

    def keep_residual(self, run: str, prototype: str, residual: StateView | None) -> None:
        """Keep ``residual`` (None: there is none: a codec without error feedback)."""
        with self._lock:
            if residual is None:
                self._residual = None
                self._remove(RESIDUAL_FILE)
                return
            state = {k: v.detach().to("cpu").contiguous() for k, v in residual.items()}
            self._residual = (run, prototype, state)
            if self.folder is not None:
                from safetensors.torch import save

                meta = {"run": run, "prototype": prototype}
                atomic_write_bytes(self.folder / RESIDUAL_FILE, save(state, metadata=meta))

    def _read_residual(self) -> tuple[str, str, State] | None:
        assert self.folder is not None
        path = self.folder / RESIDUAL_FILE
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            return meta["run"], meta["prototype"], state
        except Exception as e:  # a torn or foreign file: start without one
            log.warning("error-feedback residual %s unreadable, dropped: %s", path, e)
            self._remove(RESIDUAL_FILE)
            return None

    # -- the global models ------------------------------------------------------------------
    def model(self, digest: str) -> State | None:
        """The global model held under ``digest`` (None: not held)."""
        with self._lock:
            blob = self._models.get(digest)
        return None if blob is None else decode_state(blob)

    def keep_model(self, digest: str, state: StateView) -> None:
        """Hold ``state`` (whose model digest is ``digest``); the oldest beyond
        ``keep_models`` are dropped. A state whose encoding does not hash to ``digest``
        is not held (logged): a delta against it is then refused, and the full model
        sent."""
        blob = full_blob(state)
        if hashlib.sha256(blob).hexdigest() != digest:
            log.warning("global model %s re-encodes to another digest: not held", digest[:12])
            return
        with self._lock:
            self._models[digest] = blob
            self._models.move_to_end(digest)
            if self.folder is not None:
                atomic_write_bytes(self.folder / MODELS_DIR / f"{digest}.safetensors", blob)
            while len(self._models) > self.keep_models:
                old, _ = self._models.popitem(last=False)
                self._remove(f"{MODELS_DIR}/{old}.safetensors")

    def _load_models(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in files[-self.keep_models :]:
            blob = path.read_bytes()
            if hashlib.sha256(blob).hexdigest() != path.stem:
                log.warning("held model %s does not hash to its name: dropped", path.name)
                path.unlink(missing_ok=True)
                continue
            try:
                decode_state(blob)
            except WireError as e:
                log.warning("held model %s undecodable, dropped: %s", path.name, e)
                path.unlink(missing_ok=True)
                continue
            self._models[path.stem] = blob
        for path in files[: -self.keep_models]:
            path.unlink(missing_ok=True)

    def _remove(self, name: str) -> None:
        if self.folder is not None:
            (self.folder / name).unlink(missing_ok=True)
