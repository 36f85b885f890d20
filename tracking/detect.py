"""Face detection in milliseconds: OpenCV's LBP frontal-face cascade, run in numpy on many windows at once.

The cascade (Liao et al., "Learning Multi-scale Block Local Binary Patterns for Face Recognition", 2007;
OpenCV's lbpcascade_frontalface.xml, shipped inside scikit-image's wheel) classifies a 24x24 window, or
that window scaled, by 20 boosted stages. Each stage sums one score per weak classifier and rejects the
window below its threshold. A weak classifier reads one multi-block LBP feature: a 3x3 grid of equal
rectangles; the 8 outer ones compared with the centre one (sum >= centre sum) make an 8-bit code, and a
256-entry table gives the code's score. Rectangle sums come from an integral image: 16 corners per feature.

scikit-image runs the same cascade one window at a time over every pixel position (1.2-1.5 s for a
640x360 frame searched upright and turned four ways). Here the windows of many scales go through a stage
together (one gather of all their corners, one column per window, then array arithmetic along rows; the
first stages on a whole grid at once, from strided views), and the scan is coarse to fine: a grid
`coarse` times sparser than scikit-image's is classified first, and the full grid is evaluated only around
the windows that came close (passed _REFINE_DEPTH of the 20 stages); a face passes the cascade over a
patch of neighbouring positions and nearly passes around it, so some of them lie on the coarse grid. On a
frame without a face nearly every window is rejected within the first stages (the first two, run on the
whole grid at once, pass about one window in seven), so the search costs a few weak classifiers per
coarse window.

`detect_faces` searches a frame upright, then turned by ±15° and ±30° (faces rolled up to about 40°), or
only the searches asked for: FaceTracker spreads them over the frames of a stretch without a face.
"""
import functools
import xml.etree.ElementTree as ET

import numpy as np
import torch

# The 8 outer cells of the 3x3 grid (row-major indices) in the order of the code's bits, most significant
# first: clockwise from the top-left, as OpenCV and scikit-image read them.
_NEIGHBOURS = [0, 1, 2, 5, 8, 7, 6, 3]
# What each of the 9 cells (row-major) adds to an LBP code where it is at least the centre: the centre 0
_CELL_BITS = np.zeros(9, np.float32)
_CELL_BITS[_NEIGHBOURS] = 2.0 ** np.arange(7, -1, -1)
_STAGE_EPS = np.float32(1e-5)  # a stage passes at threshold - eps, as scikit-image's Cascade (eps=1e-5)
_DENSE_STAGES = 2  # stages run on every window of a grid at once; the rest only on the windows left
_REFINE_DEPTH = 10  # a coarse window that passes this many stages has the positions around it classified


class LbpCascade:
    """An LBP cascade in OpenCV's XML format, evaluated on arrays of windows (load with `LbpCascade.load`).

    `stumps_evaluated` counts weak classifiers run on windows (the work of a search, for tests).
    """

    def __init__(self, path):
        root = ET.parse(path).getroot()
        self.window = int(root.find(".//height").text), int(root.find(".//width").text)
        # A feature: the top-left cell's (x, y) in the 24x24 window and the cells' width and height.
        self.features = np.array([[int(v) for v in feature.find("rect").text.split()]
                                  for feature in root.find(".//features")], np.int64)
        self.stages = []  # per stage: (feature ids (S,), score tables (S, 256) float32, threshold float32)
        codes = np.arange(256)
        for stage in root.find(".//stages"):
            ids, tables = [], []
            for stump in stage.find("weakClassifiers"):
                nodes = [int(v) for v in stump.find("internalNodes").text.split()]
                left, right = (float(v) for v in stump.find("leafValues").text.split())
                lut = np.array(nodes[3:11], np.int64) & 0xFFFFFFFF  # 256 bits, as 8 unsigned 32-bit words
                bit = (lut[codes >> 5] >> (codes & 31)) & 1
                ids.append(nodes[2])
                tables.append(np.where(bit == 1, left, right))
            self.stages.append((np.array(ids), np.array(tables, np.float32),
                                np.float32(stage.find("stageThreshold").text)))
        self.stumps_evaluated = 0

    @classmethod
    def load(cls):
        """scikit-image's copy of OpenCV's frontal-face LBP cascade, parsed once per process."""
        global _frontal_face
        if _frontal_face is None:
            from skimage import data
            _frontal_face = cls(data.lbp_frontal_face_cascade_filename())
        return _frontal_face

    def detect(self, gray, min_side, max_side, scale_factor=1.2, step_ratio=1.0, coarse=2, min_neighbours=4,
               inside=None):
        """Faces in a grayscale image (H,W) as (K,4) boxes (x0, y0, x1, y1), K >= 0.

        The windows of scikit-image's `Cascade.detect_multi_scale` with the same arguments (sides from
        min_side to max_side, scale_factor apart; step_ratio times the scale between positions), and its
        grouping of overlapping hits (a face needs `min_neighbours` of them). coarse=1 evaluates every
        window, as scikit-image does; coarse=k first classifies every k-th position in each direction, then
        the positions within k-1 steps of those that came close, and scans every other scale only around the
        windows that came close on its neighbours. inside: optional (H,W) bool, the pixels that show the scene
        (a turned view's canvas is filled around it): only windows centred there are classified.
        """
        gray = np.asarray(gray)
        integral = _integral_image(gray)
        scales = _scales(self.window[0], min_side, max_side, scale_factor)
        sizes = [tuple(int(np.float32(side) * scale) for side in self.window) for scale in scales]  # (height, width)
        fits = [k for k, (height, width) in enumerate(sizes) if height < gray.shape[0] and width < gray.shape[1]]
        # Coarse to fine in scale too: every other scale is scanned whole, the ones between only around the
        # windows that came close on a neighbouring scale (a face comes close on neighbouring scales). The
        # scales of a pass are classified together (one array call per stage, not one per scale and stage).
        passes = [[k for k in fits if k % 2 == 0], [k for k in fits if k % 2]] if coarse > 1 else [fits]
        hits, close = {}, {}  # per scale: its hits (r, c, width, height); centres and sides of windows that came close
        for ks in passes:
            grids = []
            for k in ks:
                height, width = sizes[k]
                step = max(1, int(np.float32(scales[k]) * np.float32(step_ratio) + np.float32(0.5)))  # C's rounding
                candidates = None if inside is None else inside[height // 2:, width // 2:].copy()  # by top-left
                if k % 2 and coarse > 1:
                    candidates = _around([close[j] for j in (k - 1, k + 1) if j in close], (height, width),
                                         gray.shape, candidates)
                grids.append((scales[k], np.arange(0, gray.shape[0] - height, step),
                              np.arange(0, gray.shape[1] - width, step), candidates))
            for k, (passed, came_close) in zip(ks, self._scan(integral, grids, coarse)):
                height, width = sizes[k]
                hits[k] = [(r, c, width, height) for r, c in passed.tolist()]
                close[k] = np.column_stack([came_close[:, ::-1] + [width / 2, height / 2],
                                            np.full(len(came_close), width)])
        groups = _group_detections([hit for k in sorted(hits) for hit in hits[k]], min_neighbours)
        return np.array([[c, r, c + w, r + h] for r, c, w, h in groups], np.float64).reshape(-1, 4)

    def _scan(self, integral, grids, coarse):
        """Per grid (scale, rows, cols, candidates): ((K,2) rows and columns of the windows of that scale at
        these positions that pass the cascade, row-major; (J,2) those of the coarse grid's windows that came
        close). candidates: None, or whether the window at each top-left position may be classified (the
        others are not): where few may, they are classified one by one from the first stage."""
        stride, flat = integral.shape[1], integral.ravel()
        rects = [(np.float32(self.features) * np.float32(scale)).astype(np.int64) for scale, *_ in grids]  # truncated
        offsets = np.stack([_corner_offsets(r, stride) for r in rects]) if grids else np.zeros((0, 0, 16), np.int64)
        # The coarse grids' windows: those to classify from the first stage (few candidates) and those left
        # after the first stages ran on the whole grid; each with its grid's index (`which`).
        sparse, dense = ([], []), ([], [])
        for i, (scale, rows, cols, candidates) in enumerate(grids):
            rows, cols = rows[::coarse], cols[::coarse]
            starts = rows[:, None] * stride + cols[None, :]
            allowed = None if candidates is None else candidates[rows[:, None], cols[None, :]]
            if allowed is not None and allowed.mean() < 0.25:
                group, starts = sparse, starts[allowed]
            else:
                alive = self._stages_on_grid(integral, rects[i], rows, cols)
                group, starts = dense, starts[alive if allowed is None else alive & allowed]
            group[0].append(starts)
            group[1].append(np.full(len(starts), i))
        starts, which, depth = [], [], []
        for (group_starts, group_which), first_stage in ((sparse, 0), (dense, _DENSE_STAGES)):
            starts.append(np.concatenate(group_starts or [np.zeros(0, np.int64)]))
            which.append(np.concatenate(group_which or [np.zeros(0, np.int64)]))
            depth.append(self._depth(flat, starts[-1], offsets, first_stage, which[-1]))
        starts, which, depth = np.concatenate(starts), np.concatenate(which), np.concatenate(depth)
        came_close = [np.sort(starts[(which == i) & (depth >= _REFINE_DEPTH)]) for i in range(len(grids))]
        if coarse > 1:
            # Every fine position within coarse-1 steps of a coarse window that came close.
            fine = [_near(rows, cols, close_starts, stride, coarse, candidates)
                    for (scale, rows, cols, candidates), close_starts in zip(grids, came_close)]
            starts = np.concatenate(fine or [np.zeros(0, np.int64)])
            which = np.repeat(np.arange(len(grids)), [len(f) for f in fine])
            depth = self._depth(flat, starts, offsets, 0, which)
        else:
            order = np.lexsort((starts, which))  # row-major within each grid
            starts, which, depth = starts[order], which[order], depth[order]
        passed = starts[depth == len(self.stages)]
        passed_which = which[depth == len(self.stages)]
        return [(_rows_cols(passed[passed_which == i], stride), _rows_cols(came_close[i], stride))
                for i in range(len(grids))]

    def _stages_on_grid(self, integral, rects, rows, cols):
        """Whether each window of a grid (rows x cols, evenly spaced) passes the first _DENSE_STAGES stages.

        Most windows of a frame fail within these, so they are evaluated for every window at once: a
        feature's 16 corners for all windows are one strided view of the integral image (no gather)."""
        row_step, col_step = (int(v[1] - v[0]) if len(v) > 1 else 1 for v in (rows, cols))
        row_stride, col_stride = integral.strides
        alive = np.ones((len(rows), len(cols)), bool)
        for ids, tables, threshold in self.stages[:_DENSE_STAGES]:
            self.stumps_evaluated += alive.size * len(ids)
            cells = np.empty((len(ids), 3, 3, *alive.shape), integral.dtype)
            for stump, feature in enumerate(ids):
                x, y, w, h = rects[feature]
                # corners[a, b]: the integral image at the feature's corner (a, b) of every window
                corners = np.ndarray((4, 4, *alive.shape), integral.dtype, integral,
                                     integral.itemsize * ((rows[0] + y) * integral.shape[1] + cols[0] + x),
                                     (h * row_stride, w * col_stride, row_step * row_stride, col_step * col_stride))
                across = corners[:, 1:] - corners[:, :-1]
                np.subtract(across[1:], across[:-1], out=cells[stump])
            alive &= self._stage_totals(cells.reshape(len(ids), 9, -1), tables).reshape(alive.shape) \
                >= threshold - _STAGE_EPS
        return alive

    @staticmethod
    def _stage_totals(cells, tables):
        """A stage's score per window: cells (S, 9, N), each stump's 3x3 cell sums per window, and the
        stumps' score tables (S, 256) -> (N,) float32.

        The LBP code: bit 7 - i set where the i-th of _NEIGHBOURS is at least the centre cell; one
        matrix product packs the comparisons of every stump and window (_CELL_BITS; exact in float32)."""
        at_least = np.greater_equal(cells, cells[:, 4:5], out=np.empty(cells.shape, np.float32), casting="unsafe")
        codes = (_CELL_BITS @ at_least).astype(np.intp)  # (S, N)
        codes += (256 * np.arange(len(tables)))[:, None]
        # Summed one stump after another in float32, as the C loop does (the order decides rare ties).
        return np.add.reduce(tables.ravel().take(codes), axis=0)

    def _depth(self, flat_integral, starts, offsets, first_stage=0, which=None):
        """How many stages each window (its top-left corner's flat index) passes, from first_stage on
        (first_stage when it fails that one, len(stages) when it passes all).

        offsets: _corner_offsets (features, 16) of the windows' scale, or (grids, features, 16) with `which`
        (N,), the index of each window's scale: windows of many scales classified together."""
        if which is None:
            offsets, which = offsets[None], np.zeros(len(starts), np.intp)
        depth = np.full(len(starts), first_stage)
        alive = np.arange(len(starts))
        for ids, tables, threshold in self.stages[first_stage:]:
            if not len(alive):
                break
            self.stumps_evaluated += len(alive) * len(ids)
            # One column of corners per window, one row per (corner row, corner column, stump): the
            # arithmetic below then runs along long contiguous rows, not along axes 3 or 4 long.
            stage_offsets = offsets[:, ids].transpose(2, 1, 0).reshape(16 * len(ids), len(offsets))
            at = stage_offsets.take(which[alive], axis=1)
            at += starts[alive]
            corners = flat_integral.take(at).reshape(4, 4, len(ids), len(alive))
            across = corners[:, 1:] - corners[:, :-1]
            cells = (across[1:] - across[:-1]).reshape(9, len(ids), len(alive))
            total = self._stage_totals(cells.transpose(1, 0, 2), tables)
            alive = alive[total >= threshold - _STAGE_EPS]
            depth[alive] += 1
        return depth


def _near(rows, cols, close_starts, stride, coarse, candidates):
    """Sorted flat indices of the positions of the grid rows x cols within coarse-1 steps of the windows
    `close_starts` (flat indices on it), among `candidates` if given."""
    near = np.arange(-(coarse - 1), coarse)
    r = np.searchsorted(rows, close_starts // stride)[:, None] + near
    c = np.searchsorted(cols, close_starts % stride)[:, None] + near
    r, c = np.broadcast_arrays(r[:, :, None], c[:, None, :])
    on_grid = (r >= 0) & (r < len(rows)) & (c >= 0) & (c < len(cols))
    r, c = rows[r[on_grid]], cols[c[on_grid]]
    if candidates is not None:
        r, c = r[candidates[r, c]], c[candidates[r, c]]
    return np.unique(r * stride + c)


def _rows_cols(starts, stride):
    return np.column_stack([starts // stride, starts % stride])


def _around(close, window, shape, candidates):
    """Top-left positions (a bool image) of the windows of size `window` (H,W) centred within half a side of
    a window that came close (`close`: arrays of rows (x, y, side)), and among `candidates` if given."""
    near = np.zeros((shape[0] - window[0], shape[1] - window[1]), bool)
    for x, y, side in (np.concatenate(close) if close else np.zeros((0, 3))).tolist():
        row, col, reach = int(y - window[0] / 2), int(x - window[1] / 2), int(side / 2)
        near[max(0, row - reach):max(0, row + reach + 1), max(0, col - reach):max(0, col + reach + 1)] = True
    return near if candidates is None else near & candidates[:near.shape[0], :near.shape[1]]


def _integral_image(gray):
    """(H+1, W+1) sums: integral[r, c] = gray[:r, :c].sum(); int32 where that is exact (and fast)."""
    exact = gray.dtype == np.uint8 and gray.size * 255 < 2 ** 31
    integral = np.zeros((gray.shape[0] + 1, gray.shape[1] + 1), np.int32 if exact else np.float64)
    np.cumsum(gray, 0, dtype=integral.dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], 1, out=integral[1:, 1:])
    return integral


def _corner_offsets(rects, stride):
    """(features, 16) offsets in the flattened integral image of each feature's 4x4 cell corners (rects:
    (features, 4) as (x, y, width, height) in pixels) from a window's top-left corner."""
    x, y, w, h = rects.T
    steps = np.arange(4)
    corner_rows = y[:, None, None] + steps[None, :, None] * h[:, None, None]
    corner_cols = x[:, None, None] + steps[None, None, :] * w[:, None, None]
    return (corner_rows * stride + corner_cols).reshape(len(x), 16)


_frontal_face = None


def _scales(window, min_side, max_side, scale_factor):
    """Window scales from min_side to max_side, scale_factor apart (scikit-image's valid scale factors)."""
    low = max(np.log(min_side / window) / np.log(scale_factor), 0)
    high = np.log(max_side / window) / np.log(scale_factor)
    return np.power(scale_factor, np.arange(low, high), dtype=np.float32)


def _group_detections(hits, min_neighbours, min_overlap=0.5):
    """scikit-image's grouping of hits (r, c, width, height), in their order: each joins the cluster whose
    mean window it overlaps most (intersection over the smaller area above min_overlap) or starts its own;
    the means of clusters with at least min_neighbours hits are the detections."""
    clusters = []  # [r, c, width, height sums, count]
    for hit in hits:
        best, best_score = None, min_overlap
        for cluster in clusters:
            mean = [total // cluster[4] for total in cluster[:4]]
            score = _overlap(hit, mean)
            if score > best_score:
                best, best_score = cluster, score
        if best is None:
            clusters.append([*hit, 1])
        else:
            best[:] = [total + value for total, value in zip(best, (*hit, 1))]
    return [[total // cluster[4] for total in cluster[:4]] for cluster in clusters if cluster[4] >= min_neighbours]


def _overlap(a, b):
    """Intersection of two (r, c, width, height) windows over the smaller one's area (float32, as in C)."""
    width = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    height = max(0, min(a[0] + a[3], b[0] + b[3]) - max(a[0], b[0]))
    return np.float32(width * height) / np.float32(min(a[2] * a[3], b[2] * b[3]))


# --------------------------------------------------------------------------------------------
# The full-frame search, and the check of a tracked face
# --------------------------------------------------------------------------------------------

_MIN_FACE_FRACTION = 0.1  # smallest face searched, as a fraction of the shorter image side
_MIN_FACE_PIXELS = 24     # the cascade's window: no smaller face is found
# The searched copy keeps the smallest face at least this size: 1.5 windows, where the positions tried
# are 2 px apart (scikit-image's step: the scale, rounded); smaller, they would be 1 px apart, 4x as many.
_SEARCH_FACE_PIXELS = 36
_CHECK_FACE_SIZE = 64     # a tracked face is re-checked at about this size in pixels
# The frontal detector finds faces rolled up to about ±10°. When it finds none upright, the frame
# is searched turned each way by these rolls (nearest first): faces rolled up to about ±40°.
_SEARCH_ROLLS = np.radians([15, 30])
_CANDIDATES_PER_SEARCH = 3  # the detector's largest boxes tried per search (each costs a landmark fit)
_COARSE = 2  # the full-frame scan classifies every other window position first (LbpCascade.detect)


def to_gray(image):
    """uint8 (H,W) or (H,W,3) -> (H,W) uint8 as dlib reads an rgb_pixel: (r + g + b) / 3, floored."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return ((image[..., 0].astype(np.uint16) + image[..., 1] + image[..., 2]) // 3).astype(np.uint8)
    raise ValueError(f"an image must be (H,W) or (H,W,3), got shape {image.shape}")


def search_turns():
    """The searches of a full-frame search in order, as rolls in radians: upright (0), then each of
    _SEARCH_ROLLS (a search turns the frame both ways)."""
    return [0.0, *_SEARCH_ROLLS.tolist()]


def detect_faces(image, turns=None, both_ways=True):
    """Candidate faces, most likely first, as (box (x0, y0, x1, y1), roll): roll in radians as
    `LandmarkPredictor.predict` takes it. A generator: each search runs when its candidates are
    asked for.

    turns: the searches to run (default search_turns(): upright, then the frame turned each way by each
    of _SEARCH_ROLLS in turn); each yields its largest _CANDIDATES_PER_SEARCH detections, largest first.
    both_ways=False turns the frame only by each turn's own sign (one view per turn, for a smaller budget).
    The detector also fires on some non-faces, so a caller checks each candidate's landmarks
    (FaceTracker.find) and asks for the next one. The box is the LBP cascade's window, whose scale and
    offset differ from the boxes the landmark model was trained on; `FaceTracker.fit` corrects it from the
    predicted landmarks.
    """
    image = np.asarray(image)
    # Searched on a copy shrunk by a whole factor (block averages: exact, cheap) while the smallest face
    # stays _SEARCH_FACE_PIXELS or more: the number of windows then depends only on their ratio.
    factor = max(1, int(_MIN_FACE_FRACTION * min(image.shape[:2]) / _SEARCH_FACE_PIXELS))
    gray = to_gray(_block_mean(image, factor) if factor > 1 else image)
    min_side = max(_MIN_FACE_PIXELS, int(_MIN_FACE_FRACTION * min(gray.shape)))
    for turn in search_turns() if turns is None else turns:
        found = [(box, float(roll)) for roll in ((turn, -turn) if turn and both_ways else (turn,))
                 for box in _turned_detections(gray, roll, min_side)]
        found.sort(key=lambda box_roll: -_area(box_roll[0]))
        for box, roll in found[:_CANDIDATES_PER_SEARCH]:
            yield box * factor, roll


def _turned_detections(gray, roll, min_side):
    """Detections on `gray` turned so that faces rolled by `roll` stand upright (on a canvas that
    holds the whole turned image), as upright boxes around their centres in gray's coordinates."""
    cascade = LbpCascade.load()
    if not roll:
        return list(cascade.detect(gray, min_side, max(gray.shape), coarse=_COARSE))
    height, width = gray.shape
    cos, sin = abs(np.cos(roll)), abs(np.sin(roll))
    shape = (int(np.ceil(width * sin + height * cos)), int(np.ceil(width * cos + height * sin)))
    view, inside, to_gray_points = _upright_view(gray, roll, ((width - 1) / 2, (height - 1) / 2), shape)
    boxes = cascade.detect(view, min_side, max(shape), coarse=_COARSE, inside=inside)
    centres, halves = to_gray_points((boxes[:, :2] + boxes[:, 2:]) / 2), (boxes[:, 2:] - boxes[:, :2]) / 2
    return list(np.concatenate([centres - halves, centres + halves], axis=1))


def _upright_view(gray, roll, centre, shape):
    """uint8 `gray` turned so that a face rolled by `roll` stands upright in it (bilinear, 0 outside).

    The view has `shape` (H,W) and shows gray's point `centre` (x, y) in its middle. Returns the
    view, where it shows gray ((H,W) bool), and the function mapping view points (K,2) back to gray's
    coordinates.
    """
    turn = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
    middle = (np.array(shape[::-1], np.float64) - 1) / 2
    to_gray_points = lambda points: (np.asarray(points) - middle) @ turn.T + centre  # noqa: E731
    grid, inside = _turn_sampling(gray.shape, float(roll), (float(centre[0]), float(centre[1])), tuple(shape))
    pixels = torch.from_numpy(np.ascontiguousarray(gray)).float()[None, None]
    view = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (view[0, 0] + 0.5).to(torch.uint8).numpy(), inside, to_gray_points


@functools.lru_cache(maxsize=8)
def _turn_sampling(gray_shape, roll, centre, shape):
    """Where each pixel of _upright_view's view reads gray: grid_sample's (1,H,W,2) grid (gray's pixel
    centres at -1..1), and whether it lies on gray ((H,W) bool). Every frame of a video turns alike, so
    this is computed once per size and turn."""
    cos, sin = np.cos(roll), np.sin(roll)
    ys, xs = np.indices(shape, dtype=np.float64)
    xs, ys = xs - (shape[1] - 1) / 2, ys - (shape[0] - 1) / 2
    # View point v shows gray's point centre + R(roll) (v - middle).
    x = centre[0] + cos * xs - sin * ys
    y = centre[1] + sin * xs + cos * ys
    inside = (x > -0.5) & (x < gray_shape[1] - 0.5) & (y > -0.5) & (y < gray_shape[0] - 0.5)  # on a pixel
    grid = np.stack([x / max(1, gray_shape[1] - 1), y / max(1, gray_shape[0] - 1)], axis=-1) * 2 - 1
    return torch.from_numpy(grid[None].astype(np.float32)), inside


def _block_mean(image, factor):
    """A uint8 image (H,W[,3]) shrunk `factor` times by averaging factor x factor blocks, rounded half up
    (an exact area filter in integers: a large frame is searched without converting it whole)."""
    height, width = (side // factor * factor for side in image.shape[:2])
    image = image[:height, :width]
    total = np.uint16 if 511 * factor * factor < 2 ** 16 else np.uint32  # holds 2 * sum + factor²
    rows = image[0::factor].astype(total)  # sums of factor rows, then of factor columns: each a few strided adds
    for i in range(1, factor):
        rows += image[i::factor]
    sums = rows[:, 0::factor].copy()
    for j in range(1, factor):
        sums += rows[:, j::factor]
    return ((2 * sums + factor * factor) // (2 * factor * factor)).astype(np.uint8)


def _area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def _box_iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def face_near(image, box, roll=0.0):
    """Whether the detector finds a face overlapping `box`, turned by `roll` (searched in a crop
    around it, turned upright)."""
    size = max(box[2] - box[0], box[3] - box[1])
    x0, y0 = (max(0, int(v - size)) for v in box[:2])
    x1, y1 = int(box[2] + size) + 1, int(box[3] + size) + 1
    crop = to_gray(np.asarray(image)[y0:y1, x0:x1])  # only the region searched: frames may be 4K
    if min(crop.shape) < 8:
        return False
    from skimage.transform import rescale
    scale = _CHECK_FACE_SIZE / size
    small = (rescale(crop, scale, anti_aliasing=scale < 1) * 255 + 0.5).astype(np.uint8)
    box = (np.asarray(box, np.float64) - [x0, y0, x0, y0]) * scale
    if roll:  # turned about the box's centre, which keeps the upright box where it is
        centre = (box[:2] + box[2:]) / 2
        small, _, _ = _upright_view(small, roll, centre, small.shape)
        box = box - np.tile(centre - (np.array(small.shape[::-1]) - 1) / 2, 2)
    # At this scale the face is about _CHECK_FACE_SIZE pixels: search 0.5x to 2x that, every position.
    found = LbpCascade.load().detect(small, max(_MIN_FACE_PIXELS, _CHECK_FACE_SIZE // 2), 2 * _CHECK_FACE_SIZE,
                                     coarse=1)
    return any(_box_iou(box, other) > 0.3 for other in found)
