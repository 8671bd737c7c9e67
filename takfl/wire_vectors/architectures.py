"""The model architectures as a native agent must build them: for every builder of the
zoo, at its default options and input shape and 10 classes, every state-dict entry (name,
shape, dtype) in the order PyTorch gives it, and the parameter count. A native model
whose tensors have these names and shapes exchanges weights with the coordinator."""

from __future__ import annotations

from typing import Any

import torch

from takfl.models import build_model, count_parameters, get_entry, model_names

CLASSES = 10
_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def layout(builder: str) -> dict[str, Any]:
    """One builder's default model: input shape, parameter count, state-dict entries."""
    shape = get_entry(builder).default_input_shape
    torch.manual_seed(0)
    model = build_model(builder, CLASSES, shape)
    return {
        "input_shape": list(shape),
        "num_classes": CLASSES,
        "parameters": count_parameters(model),
        "state_dict": [
            [name, list(t.shape), _DTYPES[t.dtype]] for name, t in model.state_dict().items()
        ],
    }


def architectures() -> dict[str, Any]:
    """Every builder's layout, by builder name."""
    return {name: layout(name) for name in model_names()}
