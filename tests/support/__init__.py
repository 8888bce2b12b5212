"""Helpers that tests run in subprocesses."""
