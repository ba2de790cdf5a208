"""Experiment grids: a recipe per seed paper expanded into runs, tested on every source, stored in a database."""
