"""svp's public API: the functions that train.py, sample.py and `python -m tracking` are shells around.

Example (runs offline in a few minutes on a CPU):

    import svp
    tracked = svp.track("demo", "runs/demo/tracking", size=128)   # offline demo video, toy head
    print(tracked.seq.n_frames, tracked.crops.shape)

    sd = svp.load("v1-5-pruned-emaonly.safetensors")            # your own SD weights
    images = svp.text_to_image(sd, "a photo of an astronaut", steps=25)   # uint8 (1, 512, 512, 3)
"""
import os

from model.loading import StableDiffusion, load_stable_diffusion as load
from model.pipeline import text_to_image
from tracking.pipeline import TrackedVideo, load_flame, render_conditioning, track_video

__all__ = ["load", "text_to_image", "track", "load_flame", "render_conditioning", "StableDiffusion",
           "TrackedVideo"]


def track(video: str, out_dir: str, flame: str | None = None, size: int = 512, **options) -> TrackedVideo:
    """Track `video` (a path, or "demo" for the offline demo video) into `out_dir`.

    flame: path of FLAME's generic_model.pkl (None: the built-in toy head); options: bbox, max_frames,
    max_gap, preview (see tracking.pipeline.track_video). Returns the FLAME sequence and the face crops.
    """
    if video == "demo":
        from tracking.demo import write_demo_video
        os.makedirs(out_dir, exist_ok=True)
        video = write_demo_video(os.path.join(out_dir, "demo.mp4"))
    return track_video(video, out_dir, load_flame(flame), size=size, **options)
