"""Many jobs at once: a jobs file checked before any work (jobs), run on Ray workers (cluster)."""
