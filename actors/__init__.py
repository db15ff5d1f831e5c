"""Ray actors and pools that hold models: rollout engines, learner workers, SAM2 reward workers."""
