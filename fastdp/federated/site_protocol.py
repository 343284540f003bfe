"""What the Simulation needs of a site: the FederatedSite protocol.

Two implementations: :class:`fastdp.federated.Site` (in this process: the data, the local
training and the accountant are here) and :class:`fastdp.flower.RemoteSite` (the server's view of
a site behind a Flower SuperNode, from what the site reports). The Simulation uses only these
members, so a site of either kind (or a user's own) takes part in the same round loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from fastdp.federated.site import SiteUpdate

__all__ = ["FederatedSite"]


@runtime_checkable
class FederatedSite(Protocol):
    """A hospital as the server's round loop sees it.

    Attributes:
        site_id: unique name in the federation.
        num_samples: training-set size (FedAvg's weight; the bound on what its updates may claim).
        is_private: it trains with DP-SGD and keeps an accountant.
        noise_is_private: its DP noise is unpredictable to the server (None when not private).
        epsilon_budget: the epsilon it stops at (None: no budget).
    """

    site_id: str
    num_samples: int

    @property
    def is_private(self) -> bool: ...

    @property
    def noise_is_private(self) -> bool | None: ...

    @property
    def epsilon_budget(self) -> float | None: ...

    def epsilon(self) -> float:
        """Sample-level epsilon spent so far (inf when not private)."""
        ...

    def within_budget(self) -> bool:
        """Whether one more round stays within epsilon_budget."""
        ...

    def releases(self) -> list[str]:
        """What the site sends the server (docs/privacy.md)."""
        ...

    def local_update(
        self, global_state: dict[str, torch.Tensor], round: int = 0, config: dict | None = None
    ) -> SiteUpdate:
        """Trains from global_state and returns the update (in process; a RemoteSite is asked by message)."""
        ...

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
        """{"dice", "loss"} of global_state on its validation data ({} without)."""
        ...

    def persist_state_to(self, path: Path) -> None:
        """Where the site keeps its own state file (written before each update leaves it)."""
        ...

    def state_dict(self) -> dict:
        """What the server's checkpoint keeps of the site (tensors and plain values)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict(); ValueError when it does not fit."""
        ...
