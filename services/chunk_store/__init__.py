"""The regional chunk store: the source of truth for chunks, indexes and image names, on Apache Cassandra."""
