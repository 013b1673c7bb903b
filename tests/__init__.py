"""The test suite (pytest from the repository root)."""
