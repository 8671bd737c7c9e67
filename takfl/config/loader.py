"""Load YAML into validated config objects; every problem is listed, field by field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from takfl.config.base import ModelSpec
from takfl.config.federation import FederationConfig
from takfl.config.profile import DeviceProfile, TrainingSpec

T = TypeVar("T", bound=BaseModel)

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "profiles"


def _bundled_dir() -> Path:
    try:
        import profiles

        return Path(profiles.__file__).resolve().parent
    except ImportError:  # pragma: no cover - running from a source tree without install
        return BUNDLED_DIR


@dataclass(frozen=True)
class Problem:
    location: str  # dotted field path, e.g. "training.batch_size"
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(ValueError):
    """A config file is unreadable or invalid. ``problems`` lists each one."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is not a valid config ({len(problems)} problem(s)):\n{lines}")


def _problems(err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the bundled files for the schema)"
        elif (
            "input" in e
            and e["type"] not in ("missing",)
            and not isinstance(e["input"], dict | list)
        ):
            msg = f"{msg} (got {e['input']!r})"
        out.append(Problem(loc, msg))
    return out


def bundled_names(kind: str) -> list[str]:
    """Names of bundled files: ``kind`` is ``devices`` or ``federations``."""
    return sorted(p.stem for p in (_bundled_dir() / kind).glob("*.yaml"))


def resolve(name_or_path: str | Path, kind: str) -> Path:
    """A bundled name (``raspberry-pi-5``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(str(p), [Problem("", "file not found")])
        return p
    bundled = _bundled_dir() / kind / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    raise ConfigError(
        str(name_or_path),
        [
            Problem(
                "",
                f"no such file and no bundled {kind} entry; bundled: "
                f"{', '.join(bundled_names(kind))}",
            )
        ],
    )


def parse(model: type[T], data: Any, source: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the top level must be a mapping of keys")])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _problems(e)) from e


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [Problem("", f"not valid YAML: {e}")]) from e


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    path = resolve(name_or_path, "devices")
    return parse(DeviceProfile, _read_yaml(path), str(path))


def load_federation(name_or_path: str | Path) -> FederationConfig:
    """Load a federation config and check that every prototype's profile loads too."""
    path = resolve(name_or_path, "federations")
    cfg = parse(FederationConfig, _read_yaml(path), str(path))
    problems = []
    for i, proto in enumerate(cfg.prototypes):
        ref = proto.profile
        if not Path(ref).is_absolute() and (path.parent / ref).is_file():
            ref = str((path.parent / ref).resolve())
            proto.profile = ref  # later lookups need not know where the config lived
        try:
            prof = load_profile(ref)
        except ConfigError as e:
            problems += [Problem(f"prototypes.{i}.profile", str(p)) for p in e.problems]
            continue
        if prof.prototype != proto.name:
            message = (
                f"profile {prof.name!r} is for prototype {prof.prototype!r}, not {proto.name!r}"
            )
            problems.append(Problem(f"prototypes.{i}.profile", message))
        applied = prof.training.with_dictated(proto.training)
        if prof.training.backend == "executorch" and applied.optimizer != "sgd":
            message = (
                f"profile {prof.name!r} trains through ExecuTorch, whose runtime has SGD only; "
                f"set optimizer: sgd (or leave it out)"
            )
            problems.append(Problem(f"prototypes.{i}.training.optimizer", message))
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def prototype_profile(cfg: FederationConfig, name: str) -> DeviceProfile:
    """The device profile of prototype ``name`` (a path in the config is already
    absolute once :func:`load_federation` has read it)."""
    return load_profile(cfg.prototype(name).profile)


def prototype_training(cfg: FederationConfig, name: str) -> TrainingSpec:
    """The prototype's profile training settings with the federation's overrides applied."""
    return prototype_profile(cfg, name).training.with_dictated(cfg.prototype(name).training)


def prototype_model(cfg: FederationConfig, name: str) -> ModelSpec:
    """The model of prototype ``name``: its own override, else its profile's model."""
    proto = cfg.prototype(name)
    return proto.model if proto.model is not None else prototype_profile(cfg, name).model
