"""Everything that touches a target runtime: targets, sessions, latency, per-op profiling."""
