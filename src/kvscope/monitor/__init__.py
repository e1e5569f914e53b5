"""Monitor: samplers, counters, events."""
