"""Benchmarks of the stages and the build against their limits (`grit bench ...`)."""
