"""Helpers shared by tests in several folders (imported as ``helpers.<module>``: pytest puts tests/ on
the path, see pyproject.toml)."""
