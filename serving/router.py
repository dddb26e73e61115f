"""The A/B router: which variant answers a client, sticky per client.

A client's key (its `X-Client-ID`, else the request id) and the experiment's salt are hashed to
a point in [0, 1); the point falls into a variant by cumulative weights (staging first). The
same key always lands on the same side for a given salt and weight; raising the staging weight
only moves keys from production to staging, never back; a new salt reshuffles everyone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Variant = Literal["production", "staging"]
VARIANTS: tuple[Variant, ...] = ("production", "staging")


def hash_point(salt: str, client_key: str) -> float:
    """A uniform point in [0, 1) from salt and key (the first 8 bytes of a BLAKE2b digest)."""
    digest = hashlib.blake2b(f"{salt}\x00{client_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign(salt: str, client_key: str, staging_weight: float) -> Variant:
    """The variant that serves `client_key` when staging takes `staging_weight` of clients."""
    return "staging" if hash_point(salt, client_key) < staging_weight else "production"


@dataclass(frozen=True)
class ExperimentConfig:
    """An A/B experiment: the share of clients the staging variant serves, and the salt."""

    salt: str = "bridge"
    staging_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.staging_weight <= 1.0:
            raise ValueError(f"staging_weight must be within [0, 1], got {self.staging_weight}")

    def variant_for(self, client_key: str) -> Variant:
        return assign(self.salt, client_key, self.staging_weight)
