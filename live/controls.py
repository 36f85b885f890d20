"""What a live run's page can change while it plays: the prompt, the morph toward another prompt and its
weight, the temporal strength and the conditioning scale.

The page posts changes (`Controls.update`); the live loop reads `Controls.current()` before each frame and
acts only when the version moved, so a change takes effect from the next frame into the sampler. A bad
value is refused whole (ValueError with one line the page shows) and the run goes on with what it had.
"""
import math
import threading
from dataclasses import dataclass, fields, replace

from model.temporal import VideoSampling


@dataclass(frozen=True)
class LiveSettings:
    prompt: str | None = None        # None: the avatar's training caption
    morph: str | None = None         # morph toward "a photo of <morph>"; None: no morph
    morph_weight: float = 0.5        # 0 = the avatar, 1 = the morph prompt
    temporal_strength: float = VideoSampling.temporal_strength
    conditioning_scale: float = VideoSampling.conditioning_scale


TEXT = ("prompt", "morph")
RANGES = {"morph_weight": (0.0, 1.0), "temporal_strength": (0.0, 1.0), "conditioning_scale": (0.0, math.inf)}


def checked(name: str, value):
    """`value` as the setting `name` holds it (text stripped, empty text None; numbers as float in range),
    or ValueError saying what is wrong in one line."""
    if name in TEXT:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: wants text, got {value!r}")
        return (value or "").strip() or None
    low, high = RANGES[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: wants a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):  # NaN fails every comparison
        raise ValueError(f"{name}: must be between {low:g} and {high:g}, got {value!r}")
    return number


class Controls:
    """The settings of a live run, changed from the page's thread and read from the loop's (thread-safe)."""

    def __init__(self, initial: LiveSettings | None = None):
        self._lock = threading.Lock()
        self._settings, self._version = initial or LiveSettings(), 0

    def current(self) -> tuple[int, LiveSettings]:
        """(version, settings): the version grows by one with every accepted change."""
        with self._lock:
            return self._version, self._settings

    def update(self, changes: dict) -> LiveSettings:
        """Apply `changes` ({name: value}) all together, or none of them (ValueError naming the first problem)."""
        names = [f.name for f in fields(LiveSettings)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r} (known: {', '.join(names)})")
        values = {name: checked(name, value) for name, value in changes.items()}
        with self._lock:
            self._settings, self._version = replace(self._settings, **values), self._version + 1
            return self._settings
