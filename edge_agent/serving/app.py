"""The inference service's endpoints as a pure unit: (method, path, headers, body) in,
(status, JSON body) out. The HTTP servers (:mod:`edge_agent.serving.server`) only
read requests and write what this answers.

    GET  /v1/health    200 {"status": "serving", "version": V} | 503 {"status": "no model"}
    GET  /v1/model     the release served: version, prototype, round, runtime, shapes...
    GET  /v1/metrics   requests, errors, latency p50/p99 (ms), active release
    POST /v1/predict   JSON {"inputs": (C,H,W) or (N,C,H,W) nested lists,
                             "normalised": false}
                       or raw float32 little-endian bytes (Content-Type:
                       application/octet-stream) with the header X-Shape: N,C,H,W
                       (and X-Normalised: true to skip normalisation)
                       -> {"version", "prototype", "outputs" (logits), "classes",
                           "labels" (class names, when the release has them)}

Inputs are scaled as the training loader scales raw data and normalised here with the
release's per-channel mean/std, as ``takfl-agent predict`` does. A bad request gets a
4xx with ``{"error": "..."}``; nothing a client sends stops the service.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.serving.model import ModelHolder, ServedModel
from edge_agent.serving.stats import InferenceStats

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
RAW_TYPE = "application/octet-stream"
SHAPE_HEADER = "x-shape"
NORMALISED_HEADER = "x-normalised"


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 8 * 1024 * 1024  # larger bodies are refused (413) unread
    max_batch: int = 256  # samples in one request


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]

    def encoded(self) -> bytes:
        return json.dumps(self.body, allow_nan=False, separators=(",", ":")).encode()


class BadRequest(ValueError):
    """A request the service refuses; ``status`` is its 4xx code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> Response:
    return Response(status, {"error": message})


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def check_batch(x: np.ndarray, shape: tuple[int, int, int], limits: RequestLimits) -> np.ndarray:
    """(N, C, H, W) float32 from a sample (C, H, W) or batch, checked against the model's
    sample shape, the batch limit and finiteness."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise BadRequest(
            400,
            f"inputs of shape {list(x.shape)}; the model takes (N, {', '.join(map(str, shape))})",
        )
    if not 1 <= len(x) <= limits.max_batch:
        raise BadRequest(400, f"{len(x)} samples; send 1 to {limits.max_batch} per request")
    if not np.isfinite(x).all():
        raise BadRequest(400, "inputs hold NaN or infinity")
    return x


def parse_json_inputs(body: bytes) -> tuple[np.ndarray, bool]:
    """(inputs as float32, already normalised?) from a JSON predict body."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"body is not JSON ({e})") from e
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequest(400, 'expected a JSON object {"inputs": [...]}')
    unknown = set(doc) - {"inputs", "normalised"}
    if unknown:
        raise BadRequest(400, f"unknown keys {sorted(unknown)}; expected inputs, normalised")
    normalised = doc.get("normalised", False)
    if not isinstance(normalised, bool):
        raise BadRequest(400, "normalised must be true or false")
    try:
        x = np.asarray(doc["inputs"], dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, f"inputs must be a nested list of numbers of one shape ({e})") from e
    return x, normalised


def parse_raw_inputs(body: bytes, headers: Mapping[str, str]) -> tuple[np.ndarray, bool]:
    """(inputs, already normalised?) from raw float32 little-endian bytes and X-Shape."""
    text = headers.get(SHAPE_HEADER)
    if text is None:
        raise BadRequest(400, "raw inputs need the header X-Shape: N,C,H,W")
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError as e:
        raise BadRequest(400, f"X-Shape {text!r} is not a list of integers") from e
    if len(shape) != 4 or min(shape) < 1:
        raise BadRequest(400, f"X-Shape {text!r}: expected four positive sizes N,C,H,W")
    expected = 4 * int(np.prod(shape))
    if len(body) != expected:
        raise BadRequest(400, f"{len(body)} bytes; X-Shape {text} needs {expected}")
    x = np.frombuffer(body, dtype="<f4").reshape(shape).astype(np.float32)
    return x, _truthy(headers.get(NORMALISED_HEADER, "false"))


def predictions(model: ServedModel, logits: np.ndarray) -> dict[str, Any]:
    """The predict answer for ``logits`` (N, K)."""
    spec = model.release.spec
    classes = [int(k) for k in logits.argmax(axis=1)]
    body: dict[str, Any] = {
        "version": model.version,
        "prototype": spec.prototype,
        "outputs": logits.tolist(),
        "classes": classes,
    }
    if spec.class_names:
        body["labels"] = [spec.class_names[k] for k in classes]
    return body


class InferenceApp:
    """Routes requests to the endpoints above; counts predictions in ``stats``."""

    def __init__(
        self,
        holder: ModelHolder,
        stats: InferenceStats,
        *,
        limits: RequestLimits | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.holder = holder
        self.stats = stats
        self.limits = limits or RequestLimits()
        self.clock = clock
        self._routes: dict[str, tuple[str, Callable[[Mapping[str, str], bytes], Response]]] = {
            "/v1/health": ("GET", self._health),
            "/v1/model": ("GET", self._model),
            "/v1/metrics": ("GET", self._metrics),
            "/v1/predict": ("POST", self._predict),
        }

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request. ``headers`` with lower-case names. Never raises."""
        route = self._routes.get(path.split("?", 1)[0])
        if route is None:
            return error(404, f"no endpoint {path}; try {', '.join(self._routes)}")
        if method != route[0]:
            return error(405, f"{path} takes {route[0]}")
        try:
            return route[1](headers, body)
        except Exception:
            log.exception("inference service: %s %s failed", method, path)
            return error(500, "internal error; see the service log")

    def oversized(self, path: str) -> Response:
        """The answer to a request whose body is over the limit (refused unread)."""
        response = error(413, f"body over {self.limits.max_body_bytes} bytes")
        if path.split("?", 1)[0] == "/v1/predict":
            self.stats.record(0.0, ok=False)
        return response

    def _health(self, _headers: Mapping[str, str], _body: bytes) -> Response:
        version = self.holder.version
        if version is None:
            return Response(503, {"status": "no model", "version": None})
        return Response(200, {"status": "serving", "version": version})

    def _model(self, _headers: Mapping[str, str], _body: bytes) -> Response:
        model = self.holder.get()
        if model is None:
            return error(503, "no model installed yet")
        return Response(200, model.summary())

    def _metrics(self, _headers: Mapping[str, str], _body: bytes) -> Response:
        return Response(200, self.stats.status(self.holder.version).model_dump())

    def _predict(self, headers: Mapping[str, str], body: bytes) -> Response:
        start = self.clock()
        response = self._answer(headers, body)
        self.stats.record(self.clock() - start, ok=response.status == 200)
        return response

    def _answer(self, headers: Mapping[str, str], body: bytes) -> Response:
        if len(body) > self.limits.max_body_bytes:
            return error(413, f"body over {self.limits.max_body_bytes} bytes")
        model = self.holder.get()  # taken once: a swap does not affect this request
        if model is None:
            return error(503, "no model installed yet")
        kind = headers.get("content-type", JSON_TYPE).split(";", 1)[0].strip().lower()
        parsers = {JSON_TYPE: parse_json_inputs, RAW_TYPE: lambda b: parse_raw_inputs(b, headers)}
        parse = parsers.get(kind)
        if parse is None:
            return error(415, f"Content-Type {kind!r}; send {JSON_TYPE} or {RAW_TYPE}")
        try:
            x, normalised = parse(body)
            x = check_batch(x, model.release.spec.input_shape, self.limits)
        except BadRequest as e:
            return error(e.status, str(e))
        logits = model.predict(x if normalised else model.normalise(x))
        if not np.isfinite(logits).all():
            return error(500, "the model produced NaN or infinity")
        return Response(200, predictions(model, logits))
