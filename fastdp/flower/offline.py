"""Keeps Flower offline: no telemetry, no update check (imported before flwr, inherited by child processes)."""

from __future__ import annotations

import os

__all__ = ["OFFLINE_ENV"]

# Flower sends telemetry and checks for updates unless told not to; fastdp keeps it offline.
# These must be set before flwr is imported and are inherited by every process started here.
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
os.environ.update(OFFLINE_ENV)
