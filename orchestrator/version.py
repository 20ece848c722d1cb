"""The package version (what `code_version` records when no git checkout is at hand)."""

__version__ = "0.1.0"
