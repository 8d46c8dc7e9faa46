"""Benchmarks run on the real local stack (Redis, Cassandra, FUSE). See README, "Benchmarks"."""
