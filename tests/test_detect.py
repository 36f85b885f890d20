"""Tests for tracking/detect.py: the LBP cascade in numpy against scikit-image's, the coarse-to-fine scan,
and the cost of a search on a frame without a face (counted in weak classifiers run, not timed)."""
import numpy as np
import pytest
import skimage.data
from skimage.transform import resize

from tracking import detect


@pytest.fixture(scope="module")
def cascade():
    return detect.LbpCascade.load()


def gray(image):
    return detect.to_gray(image)


def faceless_frame(shape=(360, 640)):
    """The coffee photo (a cup, a saucer, a table: no face) resized to a video frame."""
    return (resize(skimage.data.coffee(), shape, anti_aliasing=True) * 255).round().astype(np.uint8)


def skimage_boxes(image, min_side, max_side):
    from skimage.feature import Cascade
    found = Cascade(skimage.data.lbp_frontal_face_cascade_filename()).detect_multi_scale(
        img=image, scale_factor=1.2, step_ratio=1, min_size=(min_side, min_side), max_size=(max_side, max_side))
    return sorted((d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]) for d in found)


# Images small enough for scikit-image's float32 integral image to be exact (sums below 2**24).
IMAGES = {
    "astronaut, halved": lambda: gray(skimage.data.astronaut())[::2, ::2],       # a face and a false hit
    "astronaut's face": lambda: gray(skimage.data.astronaut())[:240, 100:340],   # two overlapping groups
    "camera, halved": lambda: skimage.data.camera()[::2, ::2],                   # a man, side on: none
    "coffee": lambda: gray(skimage.data.coffee())[:200, :300],                   # none
}


@pytest.mark.parametrize("name", IMAGES)
def test_every_window_scan_matches_scikit_image(cascade, name):
    """coarse=1 evaluates every window scikit-image does, stage by stage in float32, and groups the hits
    the same way: the same boxes, to the pixel."""
    image = IMAGES[name]()
    ours = sorted(map(tuple, cascade.detect(image, 24, max(image.shape), coarse=1).astype(int).tolist()))
    assert ours == skimage_boxes(image, 24, max(image.shape))


@pytest.mark.parametrize("rows, cols", [(range(0, 200, 4), range(0, 220, 4)), ([10], range(0, 220, 6)),
                                        (range(3, 200, 6), [7])])
def test_the_grid_evaluation_equals_the_window_by_window_one(cascade, rows, cols):
    """The first stages run on a whole grid of windows at once (strided views) decide as the per-window
    evaluation (gathers) does, for grids of one row or one column too."""
    image = IMAGES["astronaut, halved"]()
    integral = detect._integral_image(image)
    rects = (np.float32(cascade.features) * np.float32(1.5)).astype(np.int64)
    rows, cols = np.array(rows), np.array(cols)
    grid = cascade._stages_on_grid(integral, rects, rows, cols)
    starts = (rows[:, None] * integral.shape[1] + cols[None, :]).ravel()
    dense = detect._DENSE_STAGES
    each = cascade._depth(integral.ravel(), starts, detect._corner_offsets(rects, integral.shape[1]))
    np.testing.assert_array_equal(grid.ravel(), each >= dense)
    assert 0 < grid.sum() < grid.size  # some windows pass the first stages, some do not


def iou(a, b):
    return detect._box_iou(a, b)


def test_coarse_scan_finds_the_face_for_a_third_of_the_work(cascade):
    """The coarse-to-fine scan finds the faces the full scan finds (a box overlapping each), evaluating
    a small part of the weak classifiers; both find nothing on the faceless photos."""
    for name in IMAGES:
        image = IMAGES[name]()
        cascade.stumps_evaluated = 0
        full = cascade.detect(image, 24, max(image.shape), coarse=1)
        full_work, cascade.stumps_evaluated = cascade.stumps_evaluated, 0
        coarse = cascade.detect(image, 24, max(image.shape), coarse=detect._COARSE)
        assert cascade.stumps_evaluated < full_work / 3, name
        faces = [box for box in full if box[2] - box[0] > 40]  # the faces (not the 26 px false hit)
        assert all(any(iou(face, box) > 0.5 for box in coarse) for face in faces), name
        assert len(coarse) <= len(full) + 1, name


def test_a_faceless_frame_is_rejected_within_a_few_classifiers_per_window(cascade):
    """A 640x360 frame without a face, searched in full (upright and four turns): the work stays within 3
    weak classifiers per window position that scikit-image would classify (each of which runs at least
    the first stage's 3). (A turned search may fire on the photo's edge: FaceTracker.find rejects what has
    no face's landmarks.)"""
    frame = faceless_frame()
    cascade.stumps_evaluated = 0
    assert len(list(detect.detect_faces(frame))) <= 2 * len(detect._SEARCH_ROLLS) * detect._CANDIDATES_PER_SEARCH
    work = cascade.stumps_evaluated
    min_side = int(detect._MIN_FACE_FRACTION * 360)
    windows = sum(windows_scanned(shape, min_side) for shape in [(360, 640)] + 4 * [turned_shape((360, 640), 30)])
    assert work < 3 * windows


def windows_scanned(shape, min_side):
    """How many windows scikit-image's scan (step_ratio 1) classifies in an image of this shape."""
    count = 0
    for scale in detect._scales(24, min_side, max(shape), 1.2):
        side = int(np.float32(24) * scale)
        step = max(1, int(scale + np.float32(0.5)))
        count += len(range(0, shape[0] - side, step)) * len(range(0, shape[1] - side, step))
    return count


def turned_shape(shape, degrees):
    cos, sin = abs(np.cos(np.radians(degrees))), abs(np.sin(np.radians(degrees)))
    return int(np.ceil(shape[1] * sin + shape[0] * cos)), int(np.ceil(shape[1] * cos + shape[0] * sin))


def test_detect_faces_runs_only_the_searches_asked_for(cascade):
    """turns=[0.0] is the upright search alone: a fraction of the full search's work; the turned searches
    each cost more than the upright one (their canvas holds the whole turned frame)."""
    frame = faceless_frame()
    cascade.stumps_evaluated = 0
    assert list(detect.detect_faces(frame, [0.0])) == []
    upright, cascade.stumps_evaluated = cascade.stumps_evaluated, 0
    list(detect.detect_faces(frame))
    assert 0 < 5 * upright < cascade.stumps_evaluated


def test_upright_view_turns_about_the_centre():
    """A bright dot turned by 90° about the image centre lands where the rotation puts it, and the
    returned mapping takes the view's point back to the original one."""
    image = np.zeros((21, 31), np.uint8)
    image[5, 20] = 255
    view, inside, to_image = detect._upright_view(image, np.pi / 2, (15.0, 10.0), (31, 21))
    found = np.argwhere(view == view.max())[0][::-1]                # (x, y) in the view
    np.testing.assert_allclose(to_image(found[None].astype(float))[0], [20, 5], atol=1e-6)
    assert view.max() == 255 and (view > 0).sum() == 1
    assert inside.all()  # a half turn of a 31x21 image about its centre: 21x31, all of it


def test_the_scales_of_a_pass_classified_together_equal_each_scale_alone(cascade):
    """_scan classifies the grids of many scales together (their windows stacked, each with its scale's
    corner offsets): the same hits and the same windows that came close as each grid scanned alone, for the
    whole-grid and the few-candidates paths and the refinement around the windows that came close."""
    image = IMAGES["astronaut, halved"]()
    integral = detect._integral_image(image)
    candidates = np.random.default_rng(0).random(image.shape) < 0.1  # few: classified one by one
    grids = [(scale, np.arange(0, image.shape[0] - int(24 * scale), step),
              np.arange(0, image.shape[1] - int(24 * scale), step), None if k % 2 == 0 else candidates)
             for k, (scale, step) in enumerate([(1.0, 1), (1.2, 1), (1.44, 1), (1.73, 2), (2.07, 2)])]
    together = cascade._scan(integral, grids, coarse=2)
    assert sum(len(passed) for passed, _ in together) > 0 and sum(len(close) for _, close in together) > 0
    for grid, (passed, came_close) in zip(grids, together):
        [(alone_passed, alone_close)] = cascade._scan(integral, [grid], coarse=2)
        np.testing.assert_array_equal(passed, alone_passed)
        np.testing.assert_array_equal(came_close, alone_close)


@pytest.mark.parametrize("factor", [2, 3, 4, 6, 12])
def test_block_mean_is_the_rounded_mean_of_each_block(factor):
    """The integer block mean equals the float mean of each factor x factor block rounded half up (halves
    occur for even factors), for 2-D and colour images and sides that are not multiples of factor."""
    rng = np.random.default_rng(factor)
    image = rng.integers(0, 256, (7 * factor + factor - 1, 5 * factor + 1, 3), dtype=np.uint8)
    image[:factor, :factor] = 255  # a block of 255s: the largest sum
    image[:factor, factor:2 * factor] = np.arange(factor)[:, None, None] < factor // 2  # a half for even factors
    mean = image[:7 * factor, :5 * factor].reshape(7, factor, 5, factor, 3).mean(axis=(1, 3))
    expected = np.floor(mean + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(detect._block_mean(image, factor), expected)
    np.testing.assert_array_equal(detect._block_mean(image[..., 1], factor), expected[..., 1])
    assert factor % 2 or mean[0, 1, 0] == 0.5 and expected[0, 1, 0] == 1


def test_upright_view_matches_scikit_image_warp():
    """The turned view (one grid_sample call) is scikit-image's bilinear warp of the photo with 0 outside,
    to within one grey level (rounding), and `inside` marks where the view shows the photo."""
    from skimage.transform import AffineTransform, warp
    image = gray(skimage.data.astronaut())[::2, ::2][:150]
    roll, shape = np.radians(30), (220, 260)
    centre = ((image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2)
    view, inside, _ = detect._upright_view(image, roll, centre, shape)
    middle = (np.array(shape[::-1]) - 1) / 2
    to_image = (AffineTransform(translation=-middle) + AffineTransform(rotation=roll)
                + AffineTransform(translation=centre))
    expected = warp(image.astype(np.float64), to_image, output_shape=shape, order=1, cval=0, preserve_range=True)
    assert np.abs(view - expected)[inside].max() <= 1
    assert 0.3 < inside.mean() < 0.9 and (view[~inside] < 255).all()
