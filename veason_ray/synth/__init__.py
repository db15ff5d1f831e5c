"""The synthetic world: short videos of moving, occluding, entering and leaving shapes with referring,
reasoning and no-target expressions that are true of the pixels, written in the ReVOS or ReasonVOS layout."""

from __future__ import annotations

from veason_ray.synth.expressions import SynthExpression, generate_expressions
from veason_ray.synth.world import Scene, SceneObject, WorldConfig, simulate_scene
from veason_ray.synth.writer import SynthSummary, simulate_video, write_synthetic_dataset

__all__ = [
    "Scene",
    "SceneObject",
    "SynthExpression",
    "SynthSummary",
    "WorldConfig",
    "generate_expressions",
    "simulate_scene",
    "simulate_video",
    "write_synthetic_dataset",
]
