"""The stage tests use the shared fixtures of tests/conftest.py: `tiny_model(family)` and `cached(family)` (a prepared
and cached sample dataset per family, session-scoped; the e2e tests share it too)."""
