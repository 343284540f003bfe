"""Opacus's `opacus.utils` names, so that an Opacus script changes only its imports."""
