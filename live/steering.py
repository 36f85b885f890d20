"""The page's controls (live/controls.py) into the sampler, frame by frame, without stalling it.

`Steering` is what Avatar.stream asks as each frame enters the stream (model/temporal.FrameSettings). It
reads `Controls.current()` every time; when the version moved, a new temporal strength or conditioning
scale applies from this frame on, and a new prompt, morph or morph weight is handed to a worker thread
that computes its text embedding (a pass of the text encoder: tens of ms on a GPU, more on a CPU) while
the frames go on with the embedding they had; the first frame to enter after it is ready takes it.
"""
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from live.controls import Controls, LiveSettings
from model.temporal import FrameSettings


def text_of(settings: LiveSettings) -> tuple:
    """What the text embedding depends on: (prompt, morph, morph weight), as Avatar.text_context takes them."""
    return (settings.prompt, settings.morph, settings.morph_weight if settings.morph else 0.0)


class Steering:
    """Per-frame sampler settings following `controls`; the first embedding is computed here, before the run."""

    def __init__(self, avatar, controls: Controls):
        self.avatar, self.controls = avatar, controls
        self.version, settings = controls.current()
        self.text = text_of(settings)
        self.now = FrameSettings(avatar.text_context(*self.text), settings.temporal_strength,
                                 settings.conditioning_scale)
        self.pending: tuple[tuple, Future] | None = None  # the newest text asked for, being encoded
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="text")
        self.message: str | None = None                    # for the page: why a change did not apply

    def __call__(self) -> FrameSettings:
        version, settings = self.controls.current()
        if version != self.version:
            self.version = version
            if (settings.temporal_strength, settings.conditioning_scale) != (self.now.temporal_strength,
                                                                             self.now.conditioning_scale):
                self.now = replace(self.now, temporal_strength=settings.temporal_strength,
                                   conditioning_scale=settings.conditioning_scale)
            wanted = text_of(settings)
            if wanted != (self.pending[0] if self.pending else self.text):
                self.pending = wanted, self.worker.submit(self.avatar.text_context, *wanted)
        if self.pending is not None and self.pending[1].done():
            (text, future), self.pending = self.pending, None
            try:
                self.now, self.text, self.message = replace(self.now, context=future.result()), text, None
            except Exception as error:  # noqa: BLE001  (the run goes on with the embedding it has)
                self.message = f"prompt not applied: {error}"
        return self.now

    def close(self):
        self.worker.shutdown(wait=False, cancel_futures=True)
