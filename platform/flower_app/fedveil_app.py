"""Marker module so the FAB is a valid Python project; the components live in the fedveil package."""
