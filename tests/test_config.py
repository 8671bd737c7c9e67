"""Device profiles and federation configs: the bundled files load, bad files are refused
with every problem named by its field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from takfl.config import (
    ConfigError,
    DeviceProfile,
    FederationConfig,
    Problem,
    bundled_names,
    load_federation,
    load_profile,
    prototype_model,
)
from takfl.models import build_model, model_names

BUNDLED_DEVICES = [
    "android-phone",
    "jetson-orin-nano",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "workstation",
]
BUNDLED_FEDERATIONS = [
    "cifar10-hetero",
    "cifar10-homo",
    "cifar10-homo-dir01",
    "cifar100-hetero",
    "cifar100-homo",
    "digits",
    "sensors",
    "sensors16",
]

GOOD_PROFILE: dict[str, Any] = {
    "name": "test-board",
    "prototype": "S",
    "hardware_class": "raspberry-pi",
    "model": {"builder": "mlp_digits", "args": {"width": 16}},
    "training": {"epochs": 1, "batch_size": 8, "threads": 1},
    "inference": {"runtime": "onnxruntime", "format": "onnx"},
    "comms": {"chunk_size_kib": 64, "compression": "fp16"},
}

GOOD_FEDERATION: dict[str, Any] = {
    "name": "test-federation",
    "data": {"dataset": "digits", "test_size": 100, "validation_size": 50, "public_size": 100},
    "partition": {"alpha": 0.5, "min_per_client": 2, "seed": 1},
    "prototypes": [
        {
            "name": "S",
            "profile": "android-phone",
            "model": {"builder": "mlp_digits"},
            "clients": 3,
            "sample_rate": 1.0,
            "data_ratio": 0.4,
        },
        {
            "name": "L",
            "profile": "workstation",
            "clients": 1,
            "sample_rate": 1.0,
            "data_ratio": 0.6,
        },
    ],
    "rounds": 2,
}

DELETE = object()  # marks a key to remove in edited()


def edited(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with dotted paths set (``"a.0.b": v``) or deleted (value DELETE)."""
    out = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = out
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key_or_index: Any = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key_or_index]
        else:
            node[key_or_index] = value
    return out


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {p.location: p.message for p in exc.value.problems}


# --- bundled files ---------------------------------------------------------------------


def test_bundled_names_are_the_shipped_files() -> None:
    assert bundled_names("devices") == BUNDLED_DEVICES
    assert bundled_names("federations") == BUNDLED_FEDERATIONS


@pytest.mark.parametrize("name", BUNDLED_DEVICES)
def test_bundled_profile_loads_and_its_model_builds(name: str) -> None:
    profile = load_profile(name)

    assert isinstance(profile, DeviceProfile)
    assert profile.name == name
    assert profile.model.builder in model_names()
    model = build_model(profile.model.builder, 10, **profile.model.args)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", BUNDLED_FEDERATIONS)
def test_bundled_federation_loads_with_consistent_prototypes(name: str) -> None:
    cfg = load_federation(name)

    assert isinstance(cfg, FederationConfig)
    assert cfg.name == name
    assert sum(p.data_ratio for p in cfg.prototypes) == pytest.approx(1.0)
    for proto in cfg.prototypes:
        assert load_profile(proto.profile).prototype == proto.name
        assert prototype_model(cfg, proto.name).builder in model_names()


def test_a_profile_loads_from_a_path(write_yaml: Any) -> None:
    path = write_yaml("board.yaml", GOOD_PROFILE)

    profile = load_profile(path)

    assert profile.name == "test-board"
    assert profile.training.batch_size == 8
    assert profile.model.args == {"width": 16}


def test_assignment_is_validated_too() -> None:
    profile = load_profile("workstation")

    with pytest.raises(ValidationError, match="batch_size"):
        profile.training.batch_size = -1


# --- bad device profiles ---------------------------------------------------------------

BAD_PROFILES = [
    pytest.param({"training.epochs": "many"}, "training.epochs", "valid integer", id="wrong-type"),
    pytest.param({"training.epochz": 3}, "training.epochz", "unknown key", id="unknown-nested-key"),
    pytest.param({"colour": "red"}, "colour", "unknown key", id="unknown-top-key"),
    pytest.param({"hardware_class": DELETE}, "hardware_class", "required", id="missing-field"),
    pytest.param({"model": DELETE}, "model", "required", id="missing-model"),
    pytest.param(
        {"training.batch_size": -8}, "training.batch_size", "greater than 0", id="negative-batch"
    ),
    pytest.param(
        {"training.threads": 0}, "training.threads", "greater than or equal to 1", id="no-threads"
    ),
    pytest.param(
        {"model.builder": "resnet99"}, "model.builder", "unknown model 'resnet99'", id="bad-model"
    ),
    pytest.param(
        {"model.args": {"widht": 16}}, "model.args", "takes no argument(s) widht", id="bad-arg"
    ),
    pytest.param(
        {"hardware_class": "toaster"}, "hardware_class", "'microcontroller'", id="bad-literal"
    ),
    pytest.param(
        {"inference.runtime": "tensorrt"}, "inference.runtime", "'onnxruntime'", id="bad-runtime"
    ),
    pytest.param(
        {"comms.chunk_size_kib": 1 << 20},
        "comms.chunk_size_kib",
        "less than or equal to 16384",
        id="huge-chunks",
    ),
    pytest.param({"comms.compression": "zip"}, "comms.compression", "'fp16'", id="bad-compression"),
]


@pytest.mark.parametrize(("changes", "location", "fragment"), BAD_PROFILES)
def test_bad_profile_names_the_field(
    write_yaml: Any, changes: dict[str, Any], location: str, fragment: str
) -> None:
    path = write_yaml("bad.yaml", edited(GOOD_PROFILE, changes))

    with pytest.raises(ConfigError) as exc:
        load_profile(path)

    problems = problems_of(exc)
    assert list(problems) == [location]
    assert fragment in problems[location]
    assert str(path) in str(exc.value)


def test_unknown_model_message_lists_the_known_ones(write_yaml: Any) -> None:
    path = write_yaml("bad.yaml", edited(GOOD_PROFILE, {"model.builder": "resnet99"}))

    with pytest.raises(ConfigError) as exc:
        load_profile(path)

    message = problems_of(exc)["model.builder"]
    assert all(name in message for name in model_names())


def test_wrong_value_is_quoted_in_the_message(write_yaml: Any) -> None:
    path = write_yaml("bad.yaml", edited(GOOD_PROFILE, {"training.epochs": "many"}))

    with pytest.raises(ConfigError) as exc:
        load_profile(path)

    assert "'many'" in problems_of(exc)["training.epochs"]


RAW_BAD_FILES = [
    pytest.param("name: [unclosed\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("name: a\n  bad-indent: b\n", "not valid YAML", id="bad-indentation"),
    pytest.param("- a\n- b\n", "top level must be a mapping", id="a-list"),
    pytest.param("", "top level must be a mapping", id="empty-file"),
]


@pytest.mark.parametrize(("text", "fragment"), RAW_BAD_FILES)
@pytest.mark.parametrize("loader", [load_profile, load_federation])
def test_unreadable_file_is_one_file_level_problem(
    write_yaml: Any, loader: Any, text: str, fragment: str
) -> None:
    path = write_yaml("broken.yaml", text)

    with pytest.raises(ConfigError) as exc:
        loader(path)

    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].location == ""
    assert fragment in exc.value.problems[0].message


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_profile(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as exc:
        load_profile("raspberry-pi-99")
    message = exc.value.problems[0].message
    assert "no bundled devices entry" in message
    assert "raspberry-pi-5" in message


def test_several_problems_are_reported_at_once(write_yaml: Any) -> None:
    bad = edited(
        GOOD_PROFILE,
        {
            "training.epochs": "many",
            "training.batch_size": -1,
            "inference.colour": "red",
            "hardware_class": DELETE,
            "model.builder": "resnet99",
        },
    )
    path = write_yaml("bad.yaml", bad)

    with pytest.raises(ConfigError) as exc:
        load_profile(path)

    assert set(problems_of(exc)) == {
        "training.epochs",
        "training.batch_size",
        "inference.colour",
        "hardware_class",
        "model.builder",
    }
    assert "5 problem(s)" in str(exc.value)
    for problem in exc.value.problems:
        assert f"{problem.location}: {problem.message}" in str(exc.value)


def test_problem_prints_as_path_and_message() -> None:
    assert str(Problem("training.epochs", "bad")) == "training.epochs: bad"
    assert str(Problem("", "not valid YAML")) == "not valid YAML"


# --- bad federation configs ------------------------------------------------------------

BAD_FEDERATIONS = [
    pytest.param(
        {"prototypes.0.data_ratio": 0.5, "prototypes.1.data_ratio": 0.6},
        "prototypes",
        "must sum to 1, they sum to 1.1",
        id="ratios-not-one",
    ),
    pytest.param(
        {"prototypes.0.data_ratio": 1.4},
        "prototypes.0.data_ratio",
        "less than or equal to 1",
        id="ratio-above-one",
    ),
    pytest.param(
        {"prototypes.1.name": "S"}, "prototypes", "must be unique", id="duplicate-prototype"
    ),
    pytest.param(
        {"prototypes.0.profile": "workstation"},
        "prototypes.0.profile",
        "'workstation' is for prototype 'L', not 'S'",
        id="profile-of-another-prototype",
    ),
    pytest.param(
        {"prototypes.1.profile": "no-such-board"},
        "prototypes.1.profile",
        "no bundled devices entry",
        id="unknown-profile",
    ),
    pytest.param(
        {"prototypes.0.model.builder": "resnet99"},
        "prototypes.0.model.builder",
        "unknown model",
        id="unknown-model-override",
    ),
    pytest.param(
        {"prototypes.0.clients": 0}, "prototypes.0.clients", "greater than 0", id="no-clients"
    ),
    pytest.param(
        {"prototypes.0.sample_rate": DELETE},
        "prototypes.0.sample_rate",
        "required",
        id="missing-sample-rate",
    ),
    pytest.param({"prototypes": []}, "prototypes", "at least 1 item", id="no-prototypes"),
    pytest.param({"rounds": "ten"}, "rounds", "valid integer", id="wrong-type"),
    pytest.param({"data.dataset": "mnist"}, "data.dataset", "'digits'", id="unknown-dataset"),
    pytest.param({"partition.alpha": 0}, "partition.alpha", "greater than 0", id="zero-alpha"),
    pytest.param(
        {"algorithm": {"name": "fedprox"}}, "algorithm.name", "'takfl'", id="unknown-algorithm"
    ),
    pytest.param(
        {"algorithm": {"lambdas": {"strategy": "fixed", "matrix": [[1.0, 0.0]]}}},
        "",
        "matrix must be 2x2",
        id="matrix-shape",
    ),
    pytest.param(
        {"algorithm": {"distill": {"temprature": 3}}},
        "algorithm.distill.temprature",
        "unknown key",
        id="unknown-distill-key",
    ),
]


@pytest.mark.parametrize(("changes", "location", "fragment"), BAD_FEDERATIONS)
def test_bad_federation_names_the_field(
    write_yaml: Any, changes: dict[str, Any], location: str, fragment: str
) -> None:
    path = write_yaml("fed.yaml", edited(GOOD_FEDERATION, changes))

    with pytest.raises(ConfigError) as exc:
        load_federation(path)

    problems = problems_of(exc)
    assert list(problems) == [location]
    assert fragment in problems[location]


def test_federation_reports_field_and_ratio_problems_together(write_yaml: Any) -> None:
    bad = edited(
        GOOD_FEDERATION,
        {"rounds": -1, "prototypes.0.data_ratio": 0.1, "partition.seed": "x"},
    )
    path = write_yaml("fed.yaml", bad)

    with pytest.raises(ConfigError) as exc:
        load_federation(path)

    assert set(problems_of(exc)) == {"rounds", "prototypes", "partition.seed"}


def test_every_mismatched_profile_is_listed(write_yaml: Any) -> None:
    bad = edited(
        GOOD_FEDERATION,
        {"prototypes.0.profile": "workstation", "prototypes.1.profile": "raspberry-pi-4"},
    )
    path = write_yaml("fed.yaml", bad)

    with pytest.raises(ConfigError) as exc:
        load_federation(path)

    problems = problems_of(exc)
    assert set(problems) == {"prototypes.0.profile", "prototypes.1.profile"}
    assert "not 'S'" in problems["prototypes.0.profile"]
    assert "not 'L'" in problems["prototypes.1.profile"]


def test_problems_inside_a_referenced_profile_are_prefixed(write_yaml: Any) -> None:
    write_yaml("boards/bad-board.yaml", edited(GOOD_PROFILE, {"training.batch_size": 0}))
    fed = edited(GOOD_FEDERATION, {"prototypes.0.profile": "bad-board.yaml"})
    path = write_yaml("boards/fed.yaml", fed)

    with pytest.raises(ConfigError) as exc:
        load_federation(path)

    message = problems_of(exc)["prototypes.0.profile"]
    assert message.startswith("training.batch_size: ")
    assert "greater than 0" in message


def test_profile_next_to_the_federation_file_is_found_from_any_directory(
    write_yaml: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_yaml("site/my-board.yaml", edited(GOOD_PROFILE, {"model.args": {"width": 24}}))
    fed = edited(GOOD_FEDERATION, {"prototypes.0.profile": "my-board.yaml"})
    del fed["prototypes"][0]["model"]  # so the model comes from the profile
    path = write_yaml("site/fed.yaml", fed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_federation(path)

    spec = prototype_model(cfg, "S")
    assert spec.builder == "mlp_digits"
    assert spec.args == {"width": 24}


# --- limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        ({"width": [8, 8]}, "width must be int, got a list"),
        ({"width": "8"}, "width must be int, got a str"),
        ({"depth": True}, "depth must be int, got a bool"),
        ({"width": 10**9}, "at most 1,000,000"),
    ],
)
def test_model_arguments_are_type_checked_against_the_builder(
    write_yaml: Any, args: dict[str, Any], fragment: str
) -> None:
    path = write_yaml("fed.yaml", edited(GOOD_FEDERATION, {"prototypes.0.model.args": args}))
    with pytest.raises(ConfigError) as exc:
        load_federation(path)
    problems = problems_of(exc)
    assert list(problems) == ["prototypes.0.model.args"]
    assert fragment in problems["prototypes.0.model.args"]


def test_a_yaml_alias_bomb_in_a_model_argument_is_refused(tmp_path: Path) -> None:
    # 9 levels of 9 references: ~387 million leaves once expanded, a few hundred bytes here
    levels = ["&l1 [x, x, x, x, x, x, x, x, x]"]
    for i in range(2, 10):
        levels.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    bomb = "\n".join(f"  - {lv}" for lv in levels)
    text = (
        "anchors:\n"
        + bomb
        + "\nname: bomb\nprototypes:\n  - {name: S, profile: android-phone, clients: 2,"
        " sample_rate: 1.0, data_ratio: 1.0, model: {builder: mlp_digits, args: {width: *l9}}}\n"
    )
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 2000
    with pytest.raises(ConfigError) as exc:
        load_federation(path)
    problems = problems_of(exc)
    assert "width must be int, got a list" in problems["prototypes.0.model.args"]
    assert "anchors" in problems  # the stray top-level key is reported too


def test_provision_refuses_client_counts_past_its_bound(tmp_path: Path) -> None:
    from coordinator.registry import MAX_CLIENTS, RegistryError, provision_agents

    cfg = load_federation("digits")
    cfg.prototypes[0].clients = 10**9
    with pytest.raises(RegistryError, match=f"at most {MAX_CLIENTS}"):
        provision_agents(cfg, tmp_path)
    assert not (tmp_path / "secrets").exists()
