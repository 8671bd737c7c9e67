"""Typed, validated configuration: device profiles and federation configs."""

from takfl.config.base import ModelSpec
from takfl.config.federation import (
    AlgorithmSpec,
    DistillSpec,
    FederationConfig,
    LambdaSpec,
    PrototypeSpec,
)
from takfl.config.loader import (
    ConfigError,
    Problem,
    bundled_names,
    load_federation,
    load_profile,
    parse,
    prototype_model,
    prototype_profile,
    prototype_training,
)
from takfl.config.profile import DeviceProfile, TrainingSpec
from takfl.config.training import LocalTraining, TrainingOverride
from takfl.method_names import ALGORITHMS, LAMBDA_STRATEGIES

__all__ = [
    "ALGORITHMS",
    "LAMBDA_STRATEGIES",
    "AlgorithmSpec",
    "ConfigError",
    "DeviceProfile",
    "DistillSpec",
    "FederationConfig",
    "LambdaSpec",
    "LocalTraining",
    "ModelSpec",
    "Problem",
    "PrototypeSpec",
    "TrainingOverride",
    "TrainingSpec",
    "bundled_names",
    "load_federation",
    "load_profile",
    "parse",
    "prototype_model",
    "prototype_profile",
    "prototype_training",
]
