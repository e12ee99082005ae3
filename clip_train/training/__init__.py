"""The training program: optimiser set-up, exact gradient caching and the Lightning module."""
