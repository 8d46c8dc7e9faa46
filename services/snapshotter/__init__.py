"""imagestream's containerd snapshotter (a proxy plugin): streamed images mount at once, others as overlay."""
