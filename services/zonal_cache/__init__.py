"""The zonal cache: one per zone, shared by its nodes, on Redis; read-through to the regional store."""
