"""Expressions about a simulated scene, each computed from the scene's masks and trajectories.

Three kinds, as in ReVOS (type_id): 0 referring (attributes: colour, shape, size), 1 reasoning (motion and
relations that need watching the video: fastest, still, leaving, entering, first collision, passing in front
of or behind another object, heading for another object, direction of motion), 2 no target (a description
or event that matches nothing in the video). Single- and multi-instance alike.

Every predicate sorts each object into target, non-target or *ambiguous* (too close to call from the
pixels, e.g. a 2-pixel overlap); an expression is only produced when no object is ambiguous, so its text is
true of exactly its targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from veason_ray.synth.world import COLOURS, SHAPES, Scene

REFERRING, REASONING, NO_TARGET = 0, 1, 2
_MIN_SPEED = 1.0  # px/frame: slower than this is neither clearly moving nor clearly still
_FASTEST_MARGIN = 1.5  # the fastest object moves at least this many times faster than the next
_MIN_MOVE = 0.5  # px: a smaller step between frames has no direction
_COLLISION_GAP = 2  # frames between the first collision and the next one
_LEAVE_FRACTION = 0.5  # "in the frame": at least this fraction of the shape inside it
_MIN_VISIBLE_PX = 6  # fewer visible pixels than this do not show an object
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

# (attribute names) of a description, most general first
_FORMS = (
    ("shape",),
    ("colour",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour"),
    ("size", "colour", "shape"),
)


@dataclass(frozen=True)
class SynthExpression:
    """One expression: its text, ReVOS type, target objects (indices = obj ids; empty for no target), and the
    predicate it states (for tests and statistics)."""

    text: str
    type_id: int
    targets: tuple[int, ...]
    predicate: str


def _phrase(values: dict[str, str], form: tuple[str, ...], plural: bool = False) -> str:
    noun = values["shape"] if "shape" in form else "shape"
    words = [values[a] for a in ("size", "colour") if a in form] + [noun + ("s" if plural else "")]
    return " ".join(words)


def _attrs(scene: Scene, i: int) -> dict[str, str]:
    o = scene.objects[i]
    return {"shape": o.shape, "colour": o.colour, "size": o.size}


def _matching(scene: Scene, values: dict[str, str], form: tuple[str, ...]) -> list[int]:
    return [i for i in range(len(scene.objects)) if all(_attrs(scene, i)[a] == values[a] for a in form)]


def unique_descriptions(scene: Scene, i: int) -> list[str]:
    """Attribute phrases ("red circle", "large star") that fit object ``i`` and no other object."""
    values = _attrs(scene, i)
    return [_phrase(values, f) for f in _FORMS if _matching(scene, values, f) == [i]]


# --- reasoning predicates: each returns {object: True (target) / False (not) / None (ambiguous)} ----------


def _still(scene: Scene) -> dict[int, bool | None]:
    out = {}
    for i, o in enumerate(scene.objects):
        out[i] = True if o.speed == 0 else (False if o.speed >= _MIN_SPEED else None)
    return out


def _leaves(scene: Scene) -> dict[int, bool | None]:
    """Targets: in the frame at some point, wholly outside it on the last frame; not: in it at the end."""
    f = scene.in_frame_fraction
    out: dict[int, bool | None] = {}
    for i in range(len(scene.objects)):
        if f[i, -1] == 0 and f[i].max() >= _LEAVE_FRACTION:
            out[i] = True
        else:
            out[i] = False if f[i, -1] >= _LEAVE_FRACTION else None
    return out


def _enters(scene: Scene) -> dict[int, bool | None]:
    """Targets: wholly outside the frame on the first frame, in it later; not: in it at the start."""
    f = scene.in_frame_fraction
    out: dict[int, bool | None] = {}
    for i in range(len(scene.objects)):
        if f[i, 0] == 0 and f[i].max() >= _LEAVE_FRACTION:
            out[i] = True
        else:
            out[i] = False if f[i, 0] >= _LEAVE_FRACTION else None
    return out


def _fastest(scene: Scene) -> dict[int, bool | None]:
    """Targets: the one clearly fastest object, when there are at least two to compare."""
    if len(scene.objects) < 2:
        return {i: None for i in range(len(scene.objects))}
    speeds = np.array([o.speed for o in scene.objects])
    order = np.argsort(-speeds, kind="stable")
    best, second = speeds[order[0]], speeds[order[1]]
    seen = (scene.visible_area[order[0]] > 0).sum() >= 3  # long enough to see it move
    clear = seen and best >= _MIN_SPEED and best >= _FASTEST_MARGIN * second
    return {i: (i == order[0]) if clear else None for i in range(len(scene.objects))}


def _moving(direction: str) -> Callable[[Scene], dict[int, bool | None]]:
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]

    def predicate(scene: Scene) -> dict[int, bool | None]:
        out = {}
        for i, o in enumerate(scene.objects):
            steps = np.diff(o.positions, axis=0)
            along, across = sign * steps[:, axis], np.abs(steps[:, 1 - axis])
            moving = np.linalg.norm(steps, axis=1) >= _MIN_MOVE
            strongly = moving & (along >= 2 * across) & (along > 0)
            weakly = moving & (along >= across) & (along > 0)
            visible = (scene.visible_area[i] > 0).sum() >= 3
            out[i] = True if strongly.all() and visible else (False if not weakly.any() else None)
        return out

    return predicate


def _first_contact(scene: Scene, pairs: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The pair among ``pairs`` that touches first, if that is clear: no pair touches on the first frame, one
    pair touches first, the next pair at least _COLLISION_GAP frames later, and both are visible then."""
    contact = scene.contact
    firsts = []
    for i, j in pairs:
        frames = np.flatnonzero(contact[i, j])
        if frames.size:
            firsts.append((int(frames[0]), (i, j)))
    if not firsts:
        return None
    firsts.sort()
    t, pair = firsts[0]
    if t == 0 or (len(firsts) > 1 and firsts[1][0] < t + _COLLISION_GAP):
        return None
    if min(scene.visible_area[pair[0], t], scene.visible_area[pair[1], t]) < _MIN_VISIBLE_PX:
        return None
    return pair


def _overlap_predicate(scene: Scene, ref: int, in_front: bool) -> dict[int, bool | None]:
    """Objects that pass in front of (or go behind) ``ref``: the nearer one visibly covers at least min_px
    pixels of the farther one's shape on some frame."""
    min_px = max(_MIN_VISIBLE_PX, int(0.1 * scene.full_area[ref].min()))
    out: dict[int, bool | None] = {}
    for j, o in enumerate(scene.objects):
        above = o.depth > scene.objects[ref].depth
        if j == ref or above != in_front:
            out[j] = False
            continue
        top, bottom = (j, ref) if above else (ref, j)
        seen = scene.overlap(top, bottom).max()
        out[j] = True if seen >= min_px else (False if seen == 0 else None)
    return out


def _approaching(scene: Scene, ref: int) -> dict[int, bool | None]:
    """Objects heading for ``ref``: on every step their own motion brings them at least _MIN_MOVE closer,
    mostly straight at it; not: never moving towards it at all."""
    out: dict[int, bool | None] = {}
    for j, o in enumerate(scene.objects):
        if j == ref:
            out[j] = False
            continue
        steps = np.diff(o.positions, axis=0)
        towards = scene.objects[ref].positions[:-1] - o.positions[:-1]
        towards /= np.maximum(np.linalg.norm(towards, axis=1, keepdims=True), 1e-9)
        closing = (steps * towards).sum(axis=1)
        straight = closing >= 0.8 * np.linalg.norm(steps, axis=1)
        visible = (scene.visible_area[j] > 0).sum() >= 3
        if (closing >= _MIN_MOVE).all() and straight.all() and visible:
            out[j] = True
        else:
            out[j] = False if (closing <= 0).all() else None
    return out


# --- templates --------------------------------------------------------------------------------------------

_EVENT_TEXTS = {
    "still": (
        ["the shape that never moves", "the object that stays still the whole time"],
        ["the shapes that never move", "all the objects that stay still the whole time"],
    ),
    "leaves": (
        [
            "the shape that leaves the frame",
            "the object that moves out of view",
            "which shape is about to leave the scene?",
        ],
        ["the shapes that leave the frame", "all the objects that move out of view"],
    ),
    "enters": (
        ["the shape that enters the frame", "the object that comes into view later on"],
        ["the shapes that enter the frame", "all the objects that come into view later on"],
    ),
    "fastest": (
        ["the shape that moves the fastest", "which object is moving faster than all the others?"],
        [],
    ),
    "moving_left": (
        ["the shape moving to the left", "the object travelling leftwards"],
        ["the shapes moving to the left"],
    ),
    "moving_right": (
        ["the shape moving to the right", "the object travelling rightwards"],
        ["the shapes moving to the right"],
    ),
    "moving_up": (
        ["the shape moving upwards", "the object heading towards the top of the frame"],
        ["the shapes moving upwards"],
    ),
    "moving_down": (
        ["the shape moving downwards", "the object heading towards the bottom of the frame"],
        ["the shapes moving downwards"],
    ),
}
_RELATION_TEXTS = {
    "in_front_of": (
        ["the shape that passes in front of the {ref}", "the object that covers part of the {ref}"],
        ["the shapes that pass in front of the {ref}"],
    ),
    "behind": (
        ["the shape that goes behind the {ref}", "the object that the {ref} partly hides"],
        ["the shapes that go behind the {ref}"],
    ),
    "approaches": (
        ["the shape moving towards the {ref}", "the object heading for the {ref}"],
        ["the shapes moving towards the {ref}"],
    ),
    "collides_with": (
        ["the shape that the {ref} collides with first", "the object that first bumps into the {ref}"],
        [],
    ),
}
_COLLIDE_FIRST_TEXTS = ["the two shapes that collide first", "which two objects touch each other first?"]
_NO_TARGET_EVENTS = ("still", "leaves", "enters")  # predicates whose empty answer reads well as "no target"

_EVENTS: dict[str, Callable[[Scene], dict[int, bool | None]]] = {
    "still": _still,
    "leaves": _leaves,
    "enters": _enters,
    "fastest": _fastest,
    **{f"moving_{d}": _moving(d) for d in ("left", "right", "up", "down")},
}


def _pick(rng: np.random.Generator, texts: list[str]) -> str:
    return texts[int(rng.integers(len(texts)))]


def _answer(labels: dict[int, bool | None]) -> tuple[int, ...] | None:
    """The targets, or None when any object is ambiguous."""
    if any(v is None for v in labels.values()):
        return None
    return tuple(i for i, v in sorted(labels.items()) if v)


def _referring_candidates(scene: Scene, rng: np.random.Generator) -> list[SynthExpression]:
    out = []
    for i in range(len(scene.objects)):
        phrases = unique_descriptions(scene, i)
        if phrases:
            out.append(SynthExpression(f"the {_pick(rng, phrases)}", REFERRING, (i,), "attributes"))
    seen = set()
    for i in range(len(scene.objects)):
        for form in _FORMS:
            group = tuple(_matching(scene, _attrs(scene, i), form))
            if len(group) < 2 or group in seen:
                continue
            seen.add(group)
            plural = _phrase(_attrs(scene, i), form, plural=True)
            lead = f"the {_NUMBERS[len(group)]}" if rng.random() < 0.5 else "all the"
            out.append(SynthExpression(f"{lead} {plural}", REFERRING, group, "attributes"))
    return out


def _reasoning_candidates(scene: Scene, rng: np.random.Generator) -> list[SynthExpression]:
    out = []
    for name, predicate in _EVENTS.items():
        targets = _answer(predicate(scene))
        singles, multis = _EVENT_TEXTS[name]
        if targets is None:
            continue
        if len(targets) == 1 or (targets and multis):
            out.append(
                SynthExpression(
                    _pick(rng, singles if len(targets) == 1 else multis), REASONING, targets, name
                )
            )
        elif not targets and name in _NO_TARGET_EVENTS:
            out.append(SynthExpression(_pick(rng, singles), NO_TARGET, (), name))
    n = len(scene.objects)
    pair = _first_contact(scene, [(i, j) for i in range(n) for j in range(i + 1, n)])
    if pair is not None:
        out.append(SynthExpression(_pick(rng, _COLLIDE_FIRST_TEXTS), REASONING, pair, "collide_first"))
    for ref in range(n):
        phrases = unique_descriptions(scene, ref)
        if not phrases:
            continue
        ref_text = phrases[0]
        relations = {
            "in_front_of": _overlap_predicate(scene, ref, in_front=True),
            "behind": _overlap_predicate(scene, ref, in_front=False),
            "approaches": _approaching(scene, ref),
        }
        for name, labels in relations.items():
            targets = _answer(labels)
            if targets:
                singles, multis = _RELATION_TEXTS[name]
                texts = singles if len(targets) == 1 else multis
                out.append(SynthExpression(_pick(rng, texts).format(ref=ref_text), REASONING, targets, name))
        pair = _first_contact(scene, [(min(ref, j), max(ref, j)) for j in range(n) if j != ref])
        if pair is not None:
            other = pair[0] if pair[1] == ref else pair[1]
            text = _pick(rng, _RELATION_TEXTS["collides_with"][0]).format(ref=ref_text)
            out.append(SynthExpression(text, REASONING, (other,), "collides_with"))
    return out


def _absent_candidates(scene: Scene) -> list[SynthExpression]:
    """Colour-shape pairs that no object has but that share the colour or the shape of one (hard negatives)."""
    present = {(o.colour, o.shape) for o in scene.objects}
    colours = {c for c, _ in present}
    shapes = {s for _, s in present}
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            if (colour, shape) not in present and (colour in colours or shape in shapes):
                out.append(SynthExpression(f"the {colour} {shape}", NO_TARGET, (), "absent_attributes"))
    return out


def _choose(rng: np.random.Generator, candidates: list[SynthExpression], k: int) -> list[SynthExpression]:
    """Up to k candidates, spread over predicates and over single/multi-instance."""
    buckets: dict[tuple[str, bool], list[SynthExpression]] = {}
    for c in candidates:
        buckets.setdefault((c.predicate, len(c.targets) > 1), []).append(c)
    keys = sorted(buckets)
    rng.shuffle(keys)
    for key in keys:
        rng.shuffle(buckets[key])
    chosen: list[SynthExpression] = []
    while len(chosen) < k and any(buckets.values()):
        for key in keys:
            if buckets[key] and len(chosen) < k:
                chosen.append(buckets[key].pop())
    return chosen


def generate_expressions(
    scene: Scene, rng: np.random.Generator, referring: int = 3, reasoning: int = 3, no_target: int = 1
) -> list[SynthExpression]:
    """Up to the given number of expressions of each type, all true of the scene, texts unique."""
    reasoning_all = _reasoning_candidates(scene, rng)
    groups = [
        (_referring_candidates(scene, rng), referring),
        ([c for c in reasoning_all if c.type_id == REASONING], reasoning),
        ([c for c in reasoning_all if c.type_id == NO_TARGET] + _absent_candidates(scene), no_target),
    ]
    out, texts = [], set()
    for candidates, k in groups:
        for c in _choose(rng, [c for c in candidates if c.text not in texts], k):
            texts.add(c.text)
            out.append(c)
    return out
