"""Helpers shared by the test suites (importable as `support.*`: setup.cfg puts tests/ on pytest's path)."""
