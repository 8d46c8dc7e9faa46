"""The regional tier's OCI Distribution side (see blobs.py)."""
