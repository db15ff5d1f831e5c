"""Driver programs and Ray Data pipelines: they build the actor pools, place them and move records."""
