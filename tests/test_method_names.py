"""One name per method: the registries are built from the torch-free name table
(takfl.method_names), and configs validate against it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from takfl.algorithms import algorithm_units
from takfl.config import FederationConfig, load_federation
from takfl.config.federation import AlgorithmSpec, LambdaSpec
from takfl.lambdas import lambda_strategies
from takfl.method_names import ALGORITHMS, LAMBDA_STRATEGIES, check_name, registry


def test_the_registries_hold_the_table_in_its_order() -> None:
    assert list(algorithm_units()) == list(ALGORITHMS)
    assert list(lambda_strategies()) == list(LAMBDA_STRATEGIES)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_registered_algorithm_is_a_valid_config_name(name: str) -> None:
    assert AlgorithmSpec(name=name).name == name


@pytest.mark.parametrize("name", LAMBDA_STRATEGIES)
def test_every_registered_strategy_is_a_valid_config_name(name: str) -> None:
    assert LambdaSpec(strategy=name).strategy == name


def test_an_unknown_name_in_a_config_lists_the_registered_ones() -> None:
    # Prepare
    raw: dict[str, Any] = copy.deepcopy(load_federation("digits").model_dump(mode="json"))
    raw["algorithm"]["name"] = "fedprox"
    raw["algorithm"]["lambdas"]["strategy"] = "magic"

    # Execute
    with pytest.raises(ValidationError) as exc:
        FederationConfig.model_validate(raw)

    # Assert: both fields, each message naming every registered unit
    errors = {tuple(e["loc"]): e["msg"] for e in exc.value.errors()}
    algorithm = errors[("algorithm", "name")]
    strategy = errors[("algorithm", "lambdas", "strategy")]
    assert "unknown algorithm 'fedprox'" in algorithm
    assert all(repr(n) in algorithm for n in ALGORITHMS)
    assert "unknown lambda strategy 'magic'" in strategy
    assert all(repr(n) in strategy for n in LAMBDA_STRATEGIES)


def test_check_name_passes_known_names_through() -> None:
    assert check_name("codec", "fp16", ("fp32", "fp16")) == "fp16"
    with pytest.raises(ValueError, match="unknown codec 'bf8'; choose from 'fp32', 'fp16'"):
        check_name("codec", "bf8", ("fp32", "fp16"))


def test_a_registry_that_differs_from_its_table_is_refused() -> None:
    units = ["a", "b"]

    assert list(registry("thing", ("b", "a"), units, str)) == ["b", "a"]
    with pytest.raises(RuntimeError, match=r"registry has \['a', 'b'\].*has \['a'\]"):
        registry("thing", ("a",), units, str)
    with pytest.raises(RuntimeError, match="name table"):
        registry("thing", ("a", "b", "c"), units, str)
