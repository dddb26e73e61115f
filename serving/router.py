"""The A/B router: which variant answers a client, sticky per client.

A client's key (its `X-Client-ID`, else the request id) and the experiment's salt are hashed to
a point in [0, 1); the point falls into a variant: staging from the bottom (its weight), the
previous Production version from the top (the canary share of a post-deploy watch), production
in between. The same key always lands on the same side for a given salt and weights; raising a
weight only moves keys from production to that variant, never between the other two; a new salt
reshuffles everyone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Variant = Literal["production", "staging", "previous"]
VARIANTS: tuple[Variant, ...] = ("production", "staging", "previous")


def hash_point(salt: str, client_key: str) -> float:
    """A uniform point in [0, 1) from salt and key (the first 8 bytes of a BLAKE2b digest)."""
    digest = hashlib.blake2b(f"{salt}\x00{client_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign(salt: str, client_key: str, staging_weight: float, previous_weight: float = 0.0) -> Variant:
    """The variant that serves `client_key` when staging takes `staging_weight` of clients and
    the previous Production version `previous_weight`."""
    point = hash_point(salt, client_key)
    if point < staging_weight:
        return "staging"
    return "previous" if point >= 1.0 - previous_weight else "production"


@dataclass(frozen=True)
class ExperimentConfig:
    """How clients are split: the share the staging variant serves (an A/B experiment), the
    share the previous Production version keeps during a post-deploy watch (the canary's
    control group), and the salt."""

    salt: str = "bridge"
    staging_weight: float = 0.0
    previous_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("staging_weight", "previous_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.staging_weight + self.previous_weight > 1.0:
            raise ValueError(
                f"staging_weight + previous_weight must not exceed 1, got {self.staging_weight} + {self.previous_weight}"
            )

    def variant_for(self, client_key: str) -> Variant:
        return assign(self.salt, client_key, self.staging_weight, self.previous_weight)
