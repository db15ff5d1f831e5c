"""The synthetic world: coloured shapes moving over a dark backdrop, rendered frame by frame.

A scene holds 3-6 objects (circle, square, triangle, star; six colours; two sizes). Each object is static,
bounces off the frame's borders, leaves the frame, or enters it, at a constant speed. Objects do not
interact; they are drawn far to near in a fixed depth order, so a nearer object occludes a farther one. The
simulation keeps, per object and frame, the *amodal* mask (the whole shape, clipped to the frame) and the
*modal* mask (its visible pixels: what a VOS annotation holds). Everything an expression says is computed
from these masks and the trajectories (see ``expressions.py``).

Coordinates are pixels, x to the right and y downwards, pixel centres at +0.5. Deterministic for a given
``numpy.random.Generator`` state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
    "cyan": (40, 210, 210),
}
SIZES = {"small": 0.075, "large": 0.14}  # nominal radius as a fraction of min(height, width)
MOTIONS = ("static", "bounce", "leave", "enter")
_MOTION_WEIGHTS = (0.15, 0.45, 0.2, 0.2)
_EXTENT = 1.25  # every shape lies within this many nominal radii of its centre
_MAX_SPEED = 0.15  # px per frame, as a fraction of min(height, width)
_MIN_VISIBLE_FRAMES = 2  # every object is clearly visible on at least this many frames
_MIN_VISIBLE_FRACTION = 0.2  # "clearly visible": this fraction of its whole area shows
_MIN_VISIBLE_PX = 6  # ... and at least this many pixels


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


# Polygons in units of the nominal radius, y downwards; the circle is analytic.
_POLYGONS = {
    "square": np.array([[-0.82, -0.82], [0.82, -0.82], [0.82, 0.82], [-0.82, 0.82]]),
    "triangle": _star(3, 1.2, 1.2)[::2],
    "star": _star(5, 1.2, 0.5),
}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v), in units of the nominal radius from the centre, lie inside the shape."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    poly = _POLYGONS[shape]
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, 1, axis=0), strict=True):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
    return inside


def _shape_window(shape: str, cx: float, cy: float, r: float) -> tuple[int, int, np.ndarray]:
    """The unclipped shape on the pixel grid: (x0, y0, mask) with mask[j, i] = pixel (x0 + i, y0 + j)."""
    ext = _EXTENT * r
    x0, y0 = int(np.floor(cx - ext)), int(np.floor(cy - ext))
    x1, y1 = int(np.ceil(cx + ext)) + 1, int(np.ceil(cy + ext)) + 1
    u = (np.arange(x0, x1) + 0.5 - cx) / r
    v = (np.arange(y0, y1) + 0.5 - cy) / r
    return x0, y0, _inside(shape, u[None, :], v[:, None])


def rasterize(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> tuple[np.ndarray, int]:
    """The shape's mask clipped to a height x width frame, and the area of the whole (unclipped) shape."""
    x0, y0, window = _shape_window(shape, cx, cy, r)
    out = np.zeros((height, width), dtype=bool)
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + window.shape[1], width), min(y0 + window.shape[0], height)
    if fx0 < fx1 and fy0 < fy1:
        out[fy0:fy1, fx0:fx1] = window[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    return out, int(window.sum())


@dataclass(eq=False)
class SceneObject:
    """One object: its look, its depth (higher = nearer, drawn later) and its centre on every frame."""

    obj_id: int
    shape: str
    colour: str
    size: str
    radius: float  # nominal radius, px
    depth: int
    motion: str  # one of MOTIONS
    positions: np.ndarray  # (T, 2) float centre (x, y) per frame, px

    @property
    def speed(self) -> float:
        """Mean distance travelled per frame, px."""
        if len(self.positions) < 2:
            return 0.0
        return float(np.linalg.norm(np.diff(self.positions, axis=0), axis=1).mean())


@dataclass(eq=False)
class Scene:
    """A simulated video: objects, their masks per frame, and the renderer."""

    height: int
    width: int
    num_frames: int
    background: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]
    amodal: np.ndarray = field(init=False)  # (N, T, H, W) bool: whole shape within the frame
    modal: np.ndarray = field(init=False)  # (N, T, H, W) bool: visible pixels
    full_area: np.ndarray = field(init=False)  # (N, T) int: area of the whole shape, inside the frame or not

    def __post_init__(self) -> None:
        n, t, h, w = len(self.objects), self.num_frames, self.height, self.width
        self.amodal = np.zeros((n, t, h, w), dtype=bool)
        self.full_area = np.zeros((n, t), dtype=np.int64)
        for i, obj in enumerate(self.objects):
            for f, (cx, cy) in enumerate(obj.positions):
                self.amodal[i, f], self.full_area[i, f] = rasterize(obj.shape, cx, cy, obj.radius, h, w)
        self.modal = self.amodal.copy()
        for i, obj in enumerate(self.objects):
            for j, other in enumerate(self.objects):
                if other.depth > obj.depth:
                    self.modal[i] &= ~self.amodal[j]

    def render(self, frame: int) -> np.ndarray:
        """Frame ``frame`` as (H, W, 3) uint8 RGB: background, then objects far to near."""
        image = self.background.copy()
        for i in sorted(range(len(self.objects)), key=lambda k: self.objects[k].depth):
            image[self.amodal[i, frame]] = COLOURS[self.objects[i].colour]
        return image

    @cached_property
    def visible_area(self) -> np.ndarray:
        """(N, T) visible pixels per object and frame."""
        return self.modal.sum(axis=(2, 3))

    @cached_property
    def in_frame_fraction(self) -> np.ndarray:
        """(N, T) fraction of each object's whole shape that lies inside the frame (occlusion ignored)."""
        return self.amodal.sum(axis=(2, 3)) / np.maximum(self.full_area, 1)

    @cached_property
    def contact(self) -> np.ndarray:
        """(N, N, T) bool: the two whole shapes touch or overlap (within one pixel) inside the frame."""
        n, t = len(self.objects), self.num_frames
        kernel = np.ones((3, 3), np.uint8)
        grown = np.stack(
            [[cv2.dilate(self.amodal[i, f].astype(np.uint8), kernel) > 0 for f in range(t)] for i in range(n)]
        )
        out = np.zeros((n, n, t), dtype=bool)
        for i in range(n):
            for j in range(i + 1, n):
                out[i, j] = out[j, i] = (grown[i] & self.amodal[j]).any(axis=(1, 2))
        return out

    def overlap(self, top: int, bottom: int) -> np.ndarray:
        """(T,) pixels where object ``top`` is visible over the whole shape of object ``bottom``."""
        return (self.modal[top] & self.amodal[bottom]).sum(axis=(1, 2))


BACKDROPS = ("positional", "vertical")  # see WorldConfig


@dataclass(frozen=True)
class WorldConfig:
    """Frame size in pixels, video length in frames, how many objects a scene holds, and the backdrop.

    backdrop "positional" (the default): red rises left to right and green top to bottom, the same in every
    video, blue is the video's own tint. "vertical": the earlier plain vertical gradient of a random colour.
    Why positional: Qwen2.5-VL has no absolute position embedding (its vision tower is translation-equivariant,
    rotary positions are relative), so a policy trained from random weights must first work out *where* a token
    lies, from the causal mask or from the picture; real footage (sky above, floor below) gives the place away,
    and so does this backdrop. A random-init policy learns to box objects sooner on it than on the vertical
    one (docs/benchmarks.md, "the grounding probe")."""

    height: int = 240
    width: int = 320
    num_frames: int = 16
    min_objects: int = 3
    max_objects: int = 6
    backdrop: str = "positional"

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"WorldConfig objects per scene: min_objects {self.min_objects}, max_objects {self.max_objects}; "
                "need 1 <= min_objects <= max_objects"
            )
        if self.backdrop not in BACKDROPS:
            raise ValueError(f"WorldConfig.backdrop is {self.backdrop!r}; use one of {', '.join(BACKDROPS)}")


def _background(rng: np.random.Generator, height: int, width: int, backdrop: str) -> np.ndarray:
    """A dark backdrop, never close to any shape colour (see ``WorldConfig``). "positional": red 20 -> 80 from
    the left edge to the right, green 20 -> 80 from top to bottom, blue 20-70 per video; every pixel is within
    RGB distance 45 of the frame's border median, so the colour tracker's background test (distance 60) holds.
    "vertical": a random dark colour brightening by 10-30 levels from top to bottom."""
    if backdrop == "positional":
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[..., 0] = np.round(20 + 60 * (np.arange(width) + 0.5) / width)[None, :]
        image[..., 1] = np.round(20 + 60 * (np.arange(height) + 0.5) / height)[:, None]
        image[..., 2] = rng.integers(20, 71)
        return image
    top = rng.integers(20, 50, size=3)
    bottom = top + rng.integers(10, 30, size=3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    column = np.round(top + ramp * (bottom - top)).astype(np.uint8)
    return np.broadcast_to(column, (height, width, 3)).copy()


def _inside_box(ext: float, cfg: WorldConfig) -> tuple[float, float, float, float]:
    return ext, cfg.width - ext, ext, cfg.height - ext


def _exit_distance(p0: np.ndarray, u: np.ndarray, ext: float, cfg: WorldConfig) -> float:
    """Distance along unit direction ``u`` after which a shape starting at ``p0`` is wholly outside."""
    limits = []
    for axis, size in ((0, cfg.width), (1, cfg.height)):
        if u[axis] > 1e-6:
            limits.append((size + ext - p0[axis]) / u[axis])
        elif u[axis] < -1e-6:
            limits.append((p0[axis] + ext) / -u[axis])
    return min(limits)


def _bounce(p0: np.ndarray, v: np.ndarray, ext: float, cfg: WorldConfig) -> np.ndarray:
    x_lo, x_hi, y_lo, y_hi = _inside_box(ext, cfg)
    lo, hi = np.array([x_lo, y_lo]), np.array([x_hi, y_hi])
    p, v, out = p0.copy(), v.copy(), [p0.copy()]
    for _ in range(cfg.num_frames - 1):
        p = p + v
        for axis in (0, 1):
            if p[axis] < lo[axis]:
                p[axis], v[axis] = 2 * lo[axis] - p[axis], -v[axis]
            elif p[axis] > hi[axis]:
                p[axis], v[axis] = 2 * hi[axis] - p[axis], -v[axis]
        out.append(p.copy())
    return np.array(out)


def _sample_start(
    rng: np.random.Generator, ext: float, cfg: WorldConfig, placed: list[tuple[np.ndarray, float]]
) -> np.ndarray | None:
    """A start position wholly inside the frame and clear of the objects already placed there."""
    x_lo, x_hi, y_lo, y_hi = _inside_box(ext, cfg)
    if x_lo >= x_hi or y_lo >= y_hi:
        return None
    for _ in range(40):
        p = np.array([rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)])
        if all(np.linalg.norm(p - q) > ext + e + 2 for q, e in placed):
            return p
    return None


def _sample_trajectory(
    rng: np.random.Generator,
    motion: str,
    ext: float,
    cfg: WorldConfig,
    placed: list[tuple[np.ndarray, float]],
) -> np.ndarray | None:
    """(T, 2) centres for one motion kind, or None when this draw does not fit."""
    T, short = cfg.num_frames, min(cfg.height, cfg.width)
    if motion == "enter":  # an entering object is a leaving one played backwards
        leave = _sample_trajectory(rng, "leave", ext, cfg, [])
        return None if leave is None else leave[::-1].copy()
    p0 = _sample_start(rng, ext, cfg, placed)
    if p0 is None:
        return None
    if motion == "static":
        return np.repeat(p0[None], T, axis=0)
    angle = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(angle), np.sin(angle)])
    if motion == "bounce":
        return _bounce(p0, u * rng.uniform(0.012, 0.08) * short, ext, cfg)
    # leave: wholly outside after 40-80% of the video, at a speed that stays plausible
    speed = _exit_distance(p0, u, ext, cfg) / (rng.uniform(0.4, 0.8) * (T - 1))
    if not 0.02 * short <= speed <= _MAX_SPEED * short:
        return None
    return p0[None] + np.arange(T)[:, None] * (u * speed)[None]


def _sample_objects(rng: np.random.Generator, cfg: WorldConfig) -> list[SceneObject] | None:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colours = rng.choice(list(COLOURS), size=int(rng.integers(2, 5)), replace=False)
    shapes = rng.choice(SHAPES, size=int(rng.integers(2, 5)), replace=False)
    depths = rng.permutation(n)
    short = min(cfg.height, cfg.width)
    objects, placed = [], []
    for i in range(n):
        size = str(rng.choice(list(SIZES)))
        radius = SIZES[size] * short * rng.uniform(0.95, 1.05)
        ext = _EXTENT * radius
        for _ in range(20):
            motion = str(rng.choice(MOTIONS, p=_MOTION_WEIGHTS))
            positions = _sample_trajectory(rng, motion, ext, cfg, placed)
            if positions is not None:
                break
        else:
            return None
        if motion in ("static", "bounce", "leave"):
            placed.append((positions[0], ext))
        objects.append(
            SceneObject(
                obj_id=i,
                shape=str(rng.choice(shapes)),
                colour=str(rng.choice(colours)),
                size=size,
                radius=radius,
                depth=int(depths[i]),
                motion=motion,
                positions=positions,
            )
        )
    return objects


def simulate_scene(rng: np.random.Generator, cfg: WorldConfig, max_attempts: int = 100) -> Scene:
    """Draw scenes until one has every object clearly visible on at least two frames."""
    for _ in range(max_attempts):
        objects = _sample_objects(rng, cfg)
        if objects is None:
            continue
        scene = Scene(
            cfg.height,
            cfg.width,
            cfg.num_frames,
            _background(rng, cfg.height, cfg.width, cfg.backdrop),
            objects,
        )
        clear = scene.visible_area >= np.maximum(_MIN_VISIBLE_PX, _MIN_VISIBLE_FRACTION * scene.full_area)
        if (clear.sum(axis=1) >= _MIN_VISIBLE_FRAMES).all():
            return scene
    raise RuntimeError(
        f"could not simulate a valid scene at {cfg.width}x{cfg.height}, {cfg.num_frames} frames "
        f"in {max_attempts} attempts (frames too small or too few?)"
    )
