"""The node's FUSE client: serves an image's tree from its index, reading chunks through the node cache on demand."""
