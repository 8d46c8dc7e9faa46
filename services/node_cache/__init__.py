"""The node cache: one per node; memory over disk, read-through to the zonal cache (regional as fallback)."""
