"""Decisions and computations with no network and no event loop."""
