"""Where the Gaussian noise of the DP ops comes from: a (seed, offset) pair per op call.

The compiled ops draw noise from a counter-based Philox generator, so the noise of one call
is a pure function of (seed, offset, element index). NoiseSource owns that pair and advances
the offset on every draw so no two calls reuse noise. In secure mode every call gets a
fresh 63-bit seed from the operating system's CSPRNG, so the noise cannot be replayed from
a saved state.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass


class ReproducibleNoiseWarning(UserWarning):
    """DP noise derived from a known seed: whoever knows the seed can subtract it, so it is not private."""


@dataclass
class NoiseSource:
    """Hands out (seed, offset) pairs for the noise-drawing ops.

    Args:
        seed: starting seed (any int; reduced to 63 bits). None draws one from the OS CSPRNG.
        secure_mode: if True, every call to `next()` returns a fresh CSPRNG seed and offset 0.
    """

    seed: int | None = None
    offset: int = 0
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = secrets.randbits(63)
        self.seed = int(self.seed) & ((1 << 63) - 1)
        if self.offset < 0:
            raise ValueError(f"NoiseSource offset must be >= 0, got {self.offset}")

    def next(self) -> tuple[int, int]:
        """Returns the (seed, offset) for one op call and advances the state."""
        if self.secure_mode:
            return secrets.randbits(63), 0
        pair = (self.seed, self.offset)
        self.offset += 1
        return pair

    def state_dict(self) -> dict:
        return {"seed": self.seed, "offset": self.offset, "secure_mode": self.secure_mode}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict(); ValueError when the seed or offset is not a non-negative integer."""
        seed, offset = state["seed"], state["offset"]
        for name, v in (("seed", seed), ("offset", offset)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"noise state {name!r} must be an integer >= 0, got {v!r}")
        self.seed = seed & ((1 << 63) - 1)
        self.offset = offset
        self.secure_mode = bool(state["secure_mode"])
