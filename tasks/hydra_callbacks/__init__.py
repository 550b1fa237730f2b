"""Hydra callbacks: what happens at the start and end of every job and of a whole multirun."""
