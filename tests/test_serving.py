"""The local inference service: predictions over JSON and raw bytes, bad requests
answered with 4xx while the service keeps answering, a hot swap under concurrent
requests that fails none, loopback by default. Real ONNX models in ONNX Runtime, real
sockets."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from edge_agent.serving.app import InferenceApp, RequestLimits
from edge_agent.serving.model import ModelHolder, ServedModel
from edge_agent.serving.server import (
    DEFAULT_LISTEN,
    LocalServer,
    TcpEndpoint,
    UnixEndpoint,
    parse_listen,
)
from edge_agent.serving.stats import InferenceStats, StatusSchedule
from export.runtimes import load_artifact
from takfl.release.keys import make_root, parse_root
from takfl.release.metadata import verify_release
from tests.release_fixtures import (
    CLASS_NAMES,
    FLEET,
    PROTOTYPE,
    build,
    normalise,
    onnx_model,
    run_onnx,
    samples,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ServedModel]:
    """Releases 1 and 2 of two different models, loaded in ONNX Runtime."""
    signer = CryptoSigner.generate_ed25519()
    root = parse_root(make_root(signer))
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for version in (1, 2):
        model = onnx_model(version)
        path = folder / f"v{version}.onnx"
        path.write_bytes(model)
        built = build(signer, version, model)
        release = verify_release(built.metadata, root, fleet=FLEET, prototype=PROTOTYPE)
        runner = load_artifact(path, runtime="onnxruntime", check_digest=False)
        out[version] = ServedModel(runner, release)
    return out


def expected(model: ServedModel, x: np.ndarray, *, normalised: bool = False) -> np.ndarray:
    """What the model's own runtime gives, bypassing the service."""
    data = Path(model.runner.path).read_bytes()  # type: ignore[attr-defined]
    return run_onnx(data, x if normalised else normalise(x))


def app_for(model: ServedModel | None, **limits: int) -> InferenceApp:
    return InferenceApp(ModelHolder(model), InferenceStats(), limits=RequestLimits(**limits))


def post_json(app: InferenceApp, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = app.handle("POST", "/v1/predict", {"content-type": "application/json"}, raw)
    return r.status, r.body


# -- the endpoints, without sockets -----------------------------------------------------------
def test_a_json_sample_is_normalised_and_classified(served: dict[int, ServedModel]) -> None:
    # Prepare
    x = samples(1, seed=3)
    # Execute
    status, body = post_json(app_for(served[1]), {"inputs": x[0].tolist()})
    # Assert
    assert status == 200
    want = expected(served[1], x)
    np.testing.assert_allclose(body["outputs"], want, rtol=1e-5, atol=1e-5)
    assert body["classes"] == [int(want.argmax())]
    assert body["labels"] == [CLASS_NAMES[int(want.argmax())]]
    assert body["version"] == 1 and body["prototype"] == PROTOTYPE


def test_a_normalised_batch_is_taken_as_it_is(served: dict[int, ServedModel]) -> None:
    x = normalise(samples(5, seed=4))

    status, body = post_json(app_for(served[2]), {"inputs": x.tolist(), "normalised": True})

    assert status == 200 and body["version"] == 2
    np.testing.assert_allclose(
        body["outputs"], expected(served[2], x, normalised=True), rtol=1e-5, atol=1e-5
    )


def test_raw_float32_bytes_give_the_same_answer_as_json(served: dict[int, ServedModel]) -> None:
    app = app_for(served[1])
    x = samples(3, seed=6)
    headers = {"content-type": "application/octet-stream", "x-shape": "3,1,8,8"}

    raw = app.handle("POST", "/v1/predict", headers, x.astype("<f4").tobytes())
    _, js = post_json(app, {"inputs": x.tolist()})

    assert raw.status == 200
    np.testing.assert_allclose(raw.body["outputs"], js["outputs"], rtol=1e-6)


BAD_REQUESTS = [
    ({"inputs": np.zeros((2, 8, 8)).tolist()}, "application/json", {}, 400),  # wrong shape
    (b"{inputs: [1, 2", "application/json", {}, 400),  # not JSON
    (b'{"inputs": [[[NaN]]]}', "application/json", {}, 400),  # NaN (and wrong shape)
    ({"inputs": [[[[0.0] * 8] * 8]] * 1, "extra": 1}, "application/json", {}, 400),
    ({"inputs": [[1, 2], [3]]}, "application/json", {}, 400),  # ragged
    ({"inputs": "zeros"}, "application/json", {}, 400),
    (b"hello", "text/plain", {}, 415),
    (b"\x00" * 256, "application/octet-stream", {}, 400),  # raw without X-Shape
    (b"\x00" * 100, "application/octet-stream", {"x-shape": "1,1,8,8"}, 400),  # short
    (b"\x00" * 256, "application/octet-stream", {"x-shape": "1,1,8,x"}, 400),
    ({"inputs": np.zeros((300, 1, 8, 8)).tolist()}, "application/json", {}, 400),  # batch
]


@pytest.mark.parametrize(("body", "kind", "headers", "status"), BAD_REQUESTS)
def test_bad_predict_requests_get_a_4xx_with_the_reason(
    served: dict[int, ServedModel], body: Any, kind: str, headers: dict[str, str], status: int
) -> None:
    app = app_for(served[1])
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    r = app.handle("POST", "/v1/predict", {"content-type": kind, **headers}, raw)

    assert r.status == status and r.body["error"]
    assert app.stats.requests == 1 and app.stats.errors == 1


def test_nan_inputs_of_the_right_shape_are_refused(served: dict[int, ServedModel]) -> None:
    x = samples(1).tolist()
    x[0][0][0][0] = float("nan")

    status, body = post_json(app_for(served[1]), json.dumps({"inputs": x}).encode())

    assert status == 400 and "NaN" in body["error"]


def test_routes_methods_sizes_and_a_missing_model(served: dict[int, ServedModel]) -> None:
    app = app_for(served[1], max_body_bytes=100)
    assert app.handle("GET", "/v1/nothing", {}, b"").status == 404
    assert app.handle("GET", "/v1/predict", {}, b"").status == 405
    assert post_json(app, {"inputs": samples(1)[0].tolist()})[0] == 413
    empty = app_for(None)
    assert post_json(empty, {"inputs": samples(1)[0].tolist()})[0] == 503
    assert empty.handle("GET", "/v1/health", {}, b"").status == 503
    assert empty.handle("GET", "/v1/model", {}, b"").status == 503


def test_model_and_metrics_describe_what_is_served(served: dict[int, ServedModel]) -> None:
    app = app_for(served[2])
    post_json(app, {"inputs": samples(1)[0].tolist()})
    post_json(app, {"inputs": []})

    model = app.handle("GET", "/v1/model", {}, b"").body
    metrics = app.handle("GET", "/v1/metrics", {}, b"").body

    assert model["version"] == 2 and model["runtime"] == "onnxruntime"
    assert model["input_shape"] == [1, 8, 8] and model["num_classes"] == 10
    assert metrics["requests"] == 2 and metrics["errors"] == 1
    assert metrics["active_version"] == 2 and metrics["latency_p50_ms"] > 0


# -- over sockets ------------------------------------------------------------------------------
@pytest.fixture
def loopback(served: dict[int, ServedModel]) -> Iterator[tuple[LocalServer, ModelHolder]]:
    holder = ModelHolder(served[1])
    app = InferenceApp(holder, InferenceStats(), limits=RequestLimits(max_body_bytes=64 * 1024))
    with LocalServer(app, TcpEndpoint("127.0.0.1", 0), timeout_s=5) as server:
        yield server, holder


def request(
    server: LocalServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, Any]]:
    endpoint = server.endpoint
    assert isinstance(endpoint, TcpEndpoint)
    c = conn or http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=30)
    c.request(method, path, body=body, headers=headers or {})
    response = c.getresponse()
    data = json.loads(response.read())
    if conn is None:
        c.close()
    return response.status, data


def json_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": x.tolist()}).encode(), {"Content-Type": "application/json"}


def test_predictions_over_loopback_http_in_json_and_raw_bytes(
    loopback: tuple[LocalServer, ModelHolder], served: dict[int, ServedModel]
) -> None:
    server, _ = loopback
    x = samples(2, seed=8)
    raw_headers = {"Content-Type": "application/octet-stream", "X-Shape": "2,1,8,8"}

    js = request(server, "POST", "/v1/predict", *json_body(x))
    raw = request(server, "POST", "/v1/predict", x.astype("<f4").tobytes(), raw_headers)

    assert js[0] == raw[0] == 200
    want = expected(served[1], x)
    np.testing.assert_allclose(js[1]["outputs"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw[1]["outputs"], want, rtol=1e-5, atol=1e-5)


def test_bad_requests_over_http_get_4xx_and_the_service_keeps_answering(
    loopback: tuple[LocalServer, ModelHolder],
) -> None:
    # Prepare
    server, _ = loopback
    endpoint = server.endpoint
    assert isinstance(endpoint, TcpEndpoint)
    json_type = {"Content-Type": "application/json"}
    # Execute: not JSON, wrong shape, NaN, too large (refused unread), no length
    answers = [
        request(server, "POST", "/v1/predict", b"not json", json_type)[0],
        request(server, "POST", "/v1/predict", *json_body(np.zeros((1, 3, 8, 8))))[0],
        request(server, "POST", "/v1/predict", b'{"inputs": [NaN]}', json_type)[0],
        request(server, "POST", "/v1/predict", b"[" * (100 * 1024), json_type)[0],
    ]
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n\r\n")
        answers.append(int(s.recv(1024).split()[1]))
    ok = request(server, "POST", "/v1/predict", *json_body(samples(1)))
    health = request(server, "GET", "/v1/health")
    metrics = request(server, "GET", "/v1/metrics")[1]
    # Assert
    assert answers == [400, 400, 400, 413, 411]
    assert ok[0] == 200 and health == (200, {"status": "serving", "version": 1})
    assert metrics["requests"] == 5 and metrics["errors"] == 4


def test_the_default_endpoint_is_loopback_only(served: dict[int, ServedModel]) -> None:
    endpoint = parse_listen(DEFAULT_LISTEN)
    app = app_for(served[1])

    with LocalServer(app, TcpEndpoint(endpoint.host, 0)) as server:
        bound = server._server.socket.getsockname()  # type: ignore[attr-defined]

    assert endpoint == TcpEndpoint("127.0.0.1", 8500)
    assert bound[0] == "127.0.0.1"


def test_all_interfaces_only_when_asked_and_said_in_the_log(
    served: dict[int, ServedModel], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING),
        LocalServer(app_for(served[1]), parse_listen("0.0.0.0:0")),
    ):
        pass

    assert any("beyond this device" in r.getMessage() for r in caplog.records)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path_ = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path_))


def test_predictions_over_a_unix_socket(served: dict[int, ServedModel], tmp_path: Path) -> None:
    path = tmp_path / "inference.sock"
    x = samples(1, seed=2)
    with LocalServer(app_for(served[2]), UnixEndpoint(path)):
        conn = UnixConnection(path)
        conn.request("POST", "/v1/predict", *json_body(x))
        response = conn.getresponse()
        body = json.loads(response.read())
        mode = stat.S_IMODE(os.stat(path).st_mode)
        conn.close()

    assert response.status == 200 and body["version"] == 2
    np.testing.assert_allclose(body["outputs"], expected(served[2], x), rtol=1e-5, atol=1e-5)
    assert mode == 0o660 and not path.exists()


def test_a_hot_swap_under_concurrent_requests_fails_none(
    loopback: tuple[LocalServer, ModelHolder], served: dict[int, ServedModel]
) -> None:
    # Prepare: 6 clients on keep-alive connections, each checking every answer
    server, holder = loopback
    endpoint = server.endpoint
    assert isinstance(endpoint, TcpEndpoint)
    x = samples(1, seed=11)
    want = {v: expected(m, x) for v, m in served.items()}
    stop = threading.Event()
    seen: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def hammer() -> None:
        conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=30)
        body, headers = json_body(x)
        while not stop.is_set():
            try:
                status, answer = request(server, "POST", "/v1/predict", body, headers, conn)
                version = answer.get("version")
                if status != 200 or version not in want:
                    raise AssertionError(f"{status} {answer}")
                np.testing.assert_allclose(answer["outputs"], want[version], rtol=1e-5, atol=1e-5)
                with lock:
                    seen.append(version)
            except Exception as e:  # every failure is recorded, none is allowed
                with lock:
                    failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=30)
        conn.close()

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    # Execute: 20 swaps between the two releases while they run
    for i in range(20):
        time.sleep(0.05)
        holder.swap(served[2 if i % 2 == 0 else 1])
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(30)
    # Assert
    assert failures == []
    assert set(seen) == {1, 2} and len(seen) > 40


def test_stats_count_and_the_status_is_due_when_changed_and_not_too_often() -> None:
    now = [0.0]
    stats = InferenceStats(window=3)
    schedule = StatusSchedule(30, clock=lambda: now[0])
    for ms in (1, 2, 3, 100):
        stats.record(ms / 1000, ok=True)
    stats.record(0.5, ok=False)

    block = stats.status(active_version=4)
    assert (block.requests, block.errors, block.active_version) == (5, 1, 4)
    assert block.latency_p50_ms == pytest.approx(3.0)  # the window keeps 2, 3, 100 ms
    assert schedule.due(block)
    schedule.sent(block)
    now[0] = 10.0
    assert not schedule.due(stats.status(active_version=5))  # changed, but too soon
    now[0] = 31.0
    assert not schedule.due(block) and schedule.due(stats.status(active_version=5))
