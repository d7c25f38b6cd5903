"""Course tooling run from the repository root (python scripts/NAME.py); a package so tests import it."""
