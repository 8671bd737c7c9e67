"""Privacy section of a federation config: plain, central differential privacy, secure
aggregation, or secure aggregation with distributed differential privacy.

``central-dp`` (DP-FedAvg at the level of a device, McMahan et al. 2018, arXiv
1710.06963): each update's delta against the round's global is clipped to an L2
bound, each prototype's sum of clipped deltas gets Gaussian noise of standard
deviation ``noise_multiplier x clip``, and an accountant from Opacus tracks the
privacy spent per prototype given its client sampling. See ``takfl.privacy``.

``secagg`` (SecAgg+): the coordinator learns only each prototype's sum per round;
``secagg-dp``: the same, and each sampled client adds its share of the sum's Gaussian
noise before masking, so the released models are DP without trusting the coordinator
with the noise (the same accountant and budget as central DP). Both clip to
``secagg.clip_norm``. See ``takfl.secagg``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from takfl.config.base import Strict
from takfl.method_names import ACCOUNTANTS, CLIPPING_MODES, PRIVACY_MODES, check_name

BUDGETED = ("central-dp", "secagg-dp")  # the modes that spend a privacy budget
SECURE = ("secagg", "secagg-dp")  # the modes whose coordinator sees only sums


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


class SecAggSpec(Strict):
    """Secure aggregation within each prototype (``mode: secagg``; SecAgg+, Bell et al.
    2020). Each sampled client clips its delta to ``clip_norm`` and masks it; the
    coordinator learns the sum of a prototype's round only."""

    # C: the L2 bound each client clips its delta to. It is also the range of the
    # fixed-point encoding and what the sum is checked against (norm <= n C), so it
    # bounds how far one client can move its prototype's mean (C / n). Unlike central
    # DP's bound (no noise scales with it here), it should pass honest updates whole
    clip_norm: float = Field(20.0, gt=0, le=1e6, allow_inf_nan=False)

    # k, each client's neighbours in the masking graph (even below n - 1); null: the full
    # graph up to 10 clients sampled, else 2 ceil(log2 n)
    neighbours: int | None = Field(None, ge=2, le=1024)
    # t, shares that recover a client's secrets; null: ceil((k + 1) / 2). The sum survives
    # while t of each dropout's neighbours (and itself) stay
    threshold: int | None = Field(None, ge=1, le=1025)
    bits: Literal[32, 64] = 32  # the group Z_(2^bits) the masked inputs live in
    # after a round's keys arrived: how long each later stage (shares, masked inputs,
    # unmasking) waits for the clients still in before closing without the others
    stage_timeout_s: float = Field(60.0, gt=0, le=3600, allow_inf_nan=False)


class PrivacySpec(Strict):
    """How much of a device's update the coordinator and the released models may reveal."""

    mode: str = "plain"  # plain | central-dp | secagg | secagg-dp
    # central-dp: the budget. The run refuses to start, or stops before a round, when the
    # epsilon at `delta` of any prototype would pass it.
    epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)
    # z: noise std on a prototype's sum / clip norm. Null: the smallest z (per prototype)
    # that keeps epsilon within the budget over the run's rounds at its sampling rate.
    noise_multiplier: float | None = Field(None, gt=0, allow_inf_nan=False)
    accountant: str = "rdp"  # Opacus's RDP (Mironov 2017) or PRV (Gopi et al. 2021)
    clipping: ClippingSpec = ClippingSpec()
    secagg: SecAggSpec = SecAggSpec()  # mode secagg: the masking graph and its timing

    @field_validator("mode")
    @classmethod
    def _registered_mode(cls, value: str) -> str:
        return check_name("privacy mode", value, PRIVACY_MODES)

    @property
    def clip_bound(self) -> float:
        """C: ``secagg.clip_norm`` in a secure mode, else ``clipping.norm``."""
        return self.secagg.clip_norm if self.mode in SECURE else self.clipping.norm

    @field_validator("accountant")
    @classmethod
    def _registered_accountant(cls, value: str) -> str:
        return check_name("accountant", value, ACCOUNTANTS)

    @model_validator(mode="after")
    def _budget_given(self) -> PrivacySpec:
        if self.mode in BUDGETED and self.epsilon is None:
            raise ValueError(
                f"{self.mode} needs a budget: set privacy.epsilon (e.g. 3) and, if you wish, "
                "privacy.delta (default 1e-5)"
            )
        if self.mode == "secagg-dp" and self.clipping.mode != "fixed":
            raise ValueError(
                "secagg-dp needs a fixed clipping bound (privacy.clipping.mode: fixed): "
                "adaptive clipping learns from a count of unclipped updates, which the "
                "coordinator never sees under secure aggregation"
            )
        return self
