"""knowledge layer."""
