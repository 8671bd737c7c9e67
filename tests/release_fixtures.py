"""Releases for the deploy tests: tiny real ONNX models (exported with torch.onnx), their
reference outputs from ONNX Runtime, TUF metadata signed with a real release key, and
offers signed as the coordinator signs them. Nothing here is a stand-in: the agent
verifies, loads and runs exactly what a coordinator would publish.

torch is imported only to export a model (the crash child never needs it).
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from securesystemslib.signer import CryptoSigner

from edge_agent.deploy.decision import Decision
from edge_agent.deploy.deployment import load_served
from edge_agent.deploy.installer import Installer
from edge_agent.deploy.slots import SlotStore
from edge_agent.serving.model import ModelHolder
from takfl.config.profile import DeviceProfile
from takfl.release.metadata import ReleaseSpec, build_release, sign_release
from takfl.release.reference import default_tolerance, encode_reference
from takfl.wire.release import ReleaseOffer, ReleaseReport
from takfl.wire.signing import sign

FLEET = "test"
PROTOTYPE = "S"
AGENT = "a1"
INPUT_SHAPE = (1, 8, 8)
CLASSES = 10
MEAN, STD = [0.5], [0.25]
CLASS_NAMES = [f"digit-{k}" for k in range(CLASSES)]


def onnx_model(seed: int) -> bytes:
    """A (N, 1, 8, 8) -> (N, 10) linear classifier as ONNX bytes (dynamic batch)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, CLASSES)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *INPUT_SHAPE),),
            buf,  # type: ignore[arg-type]  # torch.onnx writes to file objects too
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return buf.getvalue()


def run_onnx(model: bytes, x: np.ndarray) -> np.ndarray:
    """The model's logits on ``x`` (N, 1, 8, 8) normalised, in ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": np.asarray(x, np.float32)})[0])


def samples(n: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` inputs scaled as the digits loader scales them ([0, 1])."""
    return np.random.default_rng(seed).random((n, *INPUT_SHAPE), dtype=np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    return ((x - MEAN[0]) / STD[0]).astype(np.float32)


def reference_file(model: bytes, n: int = 8) -> bytes:
    """Reference inputs (normalised) and the model's own outputs on them."""
    x = normalise(samples(n, seed=1))
    return encode_reference(x, run_onnx(model, x))


@dataclass(frozen=True, kw_only=True)
class Built:
    version: int
    metadata: bytes  # signed release metadata
    model: bytes
    reference: bytes

    @property
    def blobs(self) -> dict[str, bytes]:
        """The artifacts by SHA-256, as the coordinator's blob store holds them."""
        import hashlib

        return {hashlib.sha256(b).hexdigest(): b for b in (self.model, self.reference)}


def spec(**change: Any) -> ReleaseSpec:
    fields: dict[str, Any] = {
        "fleet": FLEET,
        "prototype": PROTOTYPE,
        "round": 1,
        "runtime": "onnxruntime",
        "format": "onnx",
        "quantization": "none",
        "builder": "mlp_digits",
        "num_classes": CLASSES,
        "input_shape": INPUT_SHAPE,
        "mean": MEAN,
        "std": STD,
        "class_names": CLASS_NAMES,
        "tolerance": 1e-3,
        "min_top1": 1.0,
    }
    fields.update(change)
    return ReleaseSpec.model_validate(fields)


def build(
    signer: CryptoSigner,
    version: int,
    model: bytes,
    *,
    reference: bytes | None = None,
    model_name: str | None = None,
    expires: datetime | None = None,
    **spec_change: Any,
) -> Built:
    """A signed release of ``model`` (reference outputs from the model itself unless
    ``reference`` is given)."""
    reference = reference if reference is not None else reference_file(model)
    from safetensors.numpy import load

    outputs = load(reference)["outputs"]
    tolerance, min_top1 = default_tolerance("none", outputs)
    spec_change = {"round": version, "tolerance": tolerance, "min_top1": min_top1, **spec_change}
    md = build_release(
        spec=spec(**spec_change),
        version=version,
        model=model,
        model_name=model_name or f"{PROTOTYPE}-round-{version}-fp32.onnx",
        reference=reference,
        expires=expires,
    )
    return Built(
        version=version, metadata=sign_release(md, signer), model=model, reference=reference
    )


def offer(
    built: Built,
    secret: bytes,
    *,
    agent: str = AGENT,
    rollout: str = "r1",
    chunk_size: int = 1024,
    action: str = "install",
    sent_at: float | None = None,
) -> ReleaseOffer:
    """The coordinator's offer of ``built`` to ``agent``, signed with its secret, sent at
    ``sent_at`` (default: now)."""
    msg = ReleaseOffer(
        agent_id=agent,
        prototype=PROTOTYPE,
        rollout=rollout,
        action=action,  # type: ignore[arg-type]
        version=built.version,
        metadata=built.metadata.decode(),
        chunk_size=chunk_size,
        sent_at=time.time() if sent_at is None else sent_at,
    )
    return sign(msg, secret)


def device_profile(**inference: Any) -> DeviceProfile:
    """A profile of prototype S running ONNX on onnxruntime, with ``inference`` changes."""
    return DeviceProfile.model_validate(
        {
            "name": "test-device",
            "prototype": PROTOTYPE,
            "hardware_class": "raspberry-pi",
            "model": {"builder": "mlp_digits"},
            "inference": {"runtime": "onnxruntime", "format": "onnx", **inference},
        }
    )


def installer(
    state: Path, root: Any, profile: DeviceProfile | None = None, **kwargs: Any
) -> Installer:
    """An installer over real slots in ``state``, serving the release installed there
    (if any) as a restarted device does."""
    profile = profile or device_profile()
    store = SlotStore(state, PROTOTYPE)
    active = store.open()
    holder = ModelHolder()
    if active is not None:
        holder.swap(load_served(active, root, fleet=FLEET, profile=profile))
    return Installer(
        store, root, agent_id=AGENT, fleet=FLEET, profile=profile, holder=holder, **kwargs
    )


def feed(inst: Installer, message: ReleaseOffer, blobs: dict[str, bytes]) -> list[ReleaseReport]:
    """Play one offer through ``inst`` as the release channel does, synchronously: the
    offer, each artifact it asks for (from ``blobs``), the install. Its reports."""
    reports: list[ReleaseReport] = []
    pending = [inst.offer(message)]
    while pending:
        decision: Decision = pending.pop(0)
        reports.extend(decision.reports)
        for ref in decision.fetch:
            pending.append(inst.blob(ref.digest, blobs[ref.digest]))
        if decision.job is not None:
            pending.append(inst.install(decision.job))
    return reports
