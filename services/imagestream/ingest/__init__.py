"""Bringing an image in, shared by `imagestream push` and the regional tier's mirror (pull-through
conversion), so that both read, check and convert an image the same way:

- `registry`: a client of the Distribution API (tokens, Docker's config.json, TLS, platform selection);
- `source`: an image from an OCI layout, an OCI or docker archive, or a registry, its blobs checked
  against their digests while read;
- `convert`: its layers into one tree of chunks and an index;
- `spool`: the chunks on disk while a conversion runs;
- `upload`: the chunks and index the region lacks, stored.
"""
