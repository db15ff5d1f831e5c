"""Training the policy: token sequences with their images, per-token log-probabilities, the DeepSpeed engine,
the weights it streams out and its checkpoints. Torch and DeepSpeed only, never ray (the learner actors of
`actors/learner.py` and the SFT job of `pipelines/sft.py` drive these pieces)."""
