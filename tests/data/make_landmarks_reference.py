"""Make tests/data/landmarks_reference.json: dlib's own C++ landmarks for test images.

Run from the repository root in an environment with dlib (`pip install dlib`, a source build):
    python tests/data/make_landmarks_reference.py
CI has no dlib; tests/test_landmarks.py rebuilds the same images with `reference_images()` below
and compares tracking/landmarks.py against the stored points. The json also stores this script.
"""
import json
import os

import numpy as np
import skimage.data
from skimage.color import rgb2gray

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "landmarks_reference.json")


def rotate_nearest(image, degrees):
    """Rotate about the centre, nearest neighbour, pure numpy (bit-exact on every platform)."""
    h, w = image.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx, a = (h - 1) / 2, (w - 1) / 2, np.deg2rad(degrees)
    src_x = np.cos(a) * (cols - cx) + np.sin(a) * (rows - cy) + cx
    src_y = -np.sin(a) * (cols - cx) + np.cos(a) * (rows - cy) + cy
    src_x, src_y = np.floor(src_x + 0.5).astype(int), np.floor(src_y + 0.5).astype(int)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    out = np.zeros_like(image)
    out[inside] = image[src_y[inside], src_x[inside]]
    return out


def reference_images():
    """name -> uint8 image; deterministic from skimage's astronaut (no interpolation)."""
    rgb = skimage.data.astronaut()
    return {
        "astronaut": rgb,
        "astronaut_gray": np.floor(rgb2gray(rgb) * 255 + 0.5).astype(np.uint8),
        "astronaut_half": np.ascontiguousarray(rgb[::2, ::2]),
        "astronaut_rotated": rotate_nearest(rgb[0:300, 80:380], 15.0),
        "astronaut_cut": np.ascontiguousarray(rgb[:300, 210:]),  # face cut by the left border
    }


# (image name, box left, top, right, bottom); a dlib rectangle is integer, corners inclusive.
CASES = [
    ("astronaut", "detector"),
    ("astronaut", (160, 60, 280, 180)),
    ("astronaut", (185, 80, 265, 160)),
    ("astronaut_gray", "detector"),
    ("astronaut_gray", (170, 70, 275, 175)),
    ("astronaut_half", (87, 36, 137, 86)),
    ("astronaut_rotated", (100, 70, 200, 170)),
    ("astronaut_cut", (-36, 71, 64, 171)),
]


def main():
    import dlib
    from tracking.landmarks import default_model_path
    predictor = dlib.shape_predictor(default_model_path())
    detector = dlib.get_frontal_face_detector()
    images = reference_images()
    cases = []
    for name, box in CASES:
        if box == "detector":
            found = detector(images[name], 1)
            rect = max(found, key=lambda r: r.area())
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            source = "dlib.get_frontal_face_detector()(image, 1), largest"
        else:
            source = "fixed"
        shape = predictor(images[name], dlib.rectangle(*box))
        points = [[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)]
        cases.append(dict(image=name, box=list(box), box_source=source, landmarks=points))
    with open(__file__) as f:
        script = f.read()
    result = dict(dlib_version=dlib.__version__, model=os.path.basename(default_model_path()),
                  note="dlib returns integer points (rounded); box = dlib.rectangle(l, t, r, b)",
                  cases=cases, script=script)
    tmp = OUTPUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, OUTPUT)
    print(f"wrote {OUTPUT}: {len(cases)} cases, dlib {dlib.__version__}")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    main()
