"""Helpers shared by the test modules (fixtures live in tests/conftest.py).

pytest puts tests/ on sys.path (rootdir conftest, no tests/__init__.py), so test modules import
these as ``from helpers.dist import Ranks``; bench/ scripts insert tests/ on sys.path to do the same.
"""
