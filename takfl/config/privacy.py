"""Privacy section of a federation config: plain or central differential privacy.

``central-dp`` (DP-FedAvg at the level of a device, McMahan et al. 2018, arXiv
1710.06963): each update's delta against the round's global is clipped to an L2
bound, each prototype's sum of clipped deltas gets Gaussian noise of standard
deviation ``noise_multiplier x clip``, and an accountant from Opacus tracks the
privacy spent per prototype given its client sampling. See ``takfl.privacy``.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from takfl.config.base import Strict
from takfl.method_names import ACCOUNTANTS, CLIPPING_MODES, PRIVACY_MODES, check_name


class ClippingSpec(Strict):
    """The L2 bound on one client's delta (all floating entries together)."""

    mode: str = "fixed"  # fixed | adaptive (Andrew et al. 2021, arXiv 1905.03871)
    norm: float = Field(1.0, gt=0, allow_inf_nan=False)  # C; adaptive: its first value
    # adaptive: C <- C * exp(-learning_rate * (noised fraction unclipped - target_quantile))
    target_quantile: float = Field(0.5, gt=0, lt=1)  # gamma
    learning_rate: float = Field(0.2, gt=0, allow_inf_nan=False)  # eta_C (geometric update)
    # sigma_b, the noise on the count of unclipped updates; null: sampled clients / 20 (the
    # paper's choice); must exceed noise_multiplier / 2
    count_noise: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("mode")
    @classmethod
    def _registered_mode(cls, value: str) -> str:
        return check_name("clipping mode", value, CLIPPING_MODES)


class PrivacySpec(Strict):
    """How much of a device's update the coordinator and the released models may reveal."""

    mode: str = "plain"  # plain | central-dp
    # central-dp: the budget. The run refuses to start, or stops before a round, when the
    # epsilon at `delta` of any prototype would pass it.
    epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)
    # z: noise std on a prototype's sum / clip norm. Null: the smallest z (per prototype)
    # that keeps epsilon within the budget over the run's rounds at its sampling rate.
    noise_multiplier: float | None = Field(None, gt=0, allow_inf_nan=False)
    accountant: str = "rdp"  # Opacus's RDP (Mironov 2017) or PRV (Gopi et al. 2021)
    clipping: ClippingSpec = ClippingSpec()

    @field_validator("mode")
    @classmethod
    def _registered_mode(cls, value: str) -> str:
        return check_name("privacy mode", value, PRIVACY_MODES)

    @field_validator("accountant")
    @classmethod
    def _registered_accountant(cls, value: str) -> str:
        return check_name("accountant", value, ACCOUNTANTS)

    @model_validator(mode="after")
    def _budget_given(self) -> PrivacySpec:
        if self.mode == "central-dp" and self.epsilon is None:
            raise ValueError(
                "central-dp needs a budget: set privacy.epsilon (e.g. 3) and, if you wish, "
                "privacy.delta (default 1e-5)"
            )
        return self
