"""Deliberately naive reference implementations (per-token loops) that the library is tested
against. They live in the tests, never in the library."""
