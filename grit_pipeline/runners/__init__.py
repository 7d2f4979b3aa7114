"""Runners: where a pipeline runs (in-process or on Ray)."""
