"""The eight benchmarks of Larochelle et al. (ICML 2007), regenerated deterministically from a seed.

Vincent et al. (ICML 2008), Table 1, evaluate on these sets. The original files cannot be
downloaded here, so every set is generated: ``generate(name, seed)`` returns
``{"train", "valid", "test"} -> (x float32 [N, 784] in [0, 1], y int64)``, 28x28 row-major, with
the split sizes of the originals (``SPLIT_SIZES``). The same seed gives the same bytes.

Each purpose (which digits, rotation angles, backgrounds, shapes) draws from its own stream,
``default_rng([seed, crc32(purpose)])``. So, for one seed, the five MNIST variants use the same
digits in the same order, mnist-rot and mnist-rot-bg-img the same angles, and mnist-bg-img and
mnist-rot-bg-img the same background patches: they differ only by the transformation.

Deviations from the originals (what the papers leave unstated, or what could not be had offline):

1. MNIST source. The 62,000 digits come from the 70,000 of the classic ``mnist.pkl.gz``
   (train, valid and test concatenated in that order; see ``sda.data``). A seeded permutation is
   drawn: its first train+valid entries make the "training file", the next test entries the test
   set, so the two never share an image. As in the originals, the validation set is the last
   rows of the training file.
2. Rotation. Angle uniform in [0, 2*pi); positive angles turn the digit counter-clockwise as
   displayed. Bilinear interpolation about the image centre (pixel coordinate 13.5, 13.5), zero
   outside the image, clipped to [0, 1]. This is ``scipy.ndimage.rotate(img, degrees,
   reshape=False, order=1, mode="grid-constant")`` and ``torch.nn.functional.grid_sample``
   (bilinear, zeros padding, align_corners=False), written as a numpy gather so that it is
   batched and needs neither scipy nor torch.
3. Compositing. ``x = max(digit, background)`` for mnist-bg-rand, mnist-bg-img and
   mnist-rot-bg-img (after rotation). A background pixel brighter than a faint anti-aliased edge
   pixel wins, so digits get no dark outline (the rule "digit where digit > 0" drew one, widened
   by rotation: an easy cue a classifier could use).
4. Random background. Continuous uniform [0, 1) float32 values, not 256 grey levels.
5. Natural images. The originals used 20 photographs from the internet. Here: the 20 listed in
   ``NATURAL_IMAGES``, 18 that ship inside scikit-image (``skimage.data``; ``cat`` is left out, it
   is ``chelsea`` again; ``stereo_motorcycle`` gives its left view) and scikit-learn's two sample
   images. Loaders that would need a download are not used, and a missing one is an error, never
   a silent substitution. Colour images become grey with the ITU-R 709 luma weights of
   ``skimage.color.rgb2gray``; uint8 values are divided by 255. Images keep their native size
   (102 to 1411 pixels a side), so a 28x28 patch covers less of a large image.
6. Patch sampling. A background patch is a 28x28 window of one of the 20 images. The image is
   uniform over the 20; the window is uniform over the positions in that image whose pixel
   standard deviation is at least ``MIN_PATCH_STD`` = 0.05 (the same distribution as per-image
   rejection sampling, computed exactly from summed-area tables). rect-img uses the same sampler.
7. rect. Height and width uniform integers in [3, 28] (``RECT_SIDES``), rejected while
   |height - width| < 3; top-left uniform so the rectangle fits. Label 1 = tall (height > width),
   0 = wide.
8. rect-img. Height and width uniform integers in [10, 28], rejected unless the area is within
   [196, 588] pixels (25%-75% of 784, inclusive) and |height - width| >= 5. The rectangle (border
   and inside) shows a patch of one image, the rest a patch of a different image. Label 1 = tall.
9. convex. Half-planes are evaluated at the pixel centres; each boundary line passes through a
   point uniform over the image square, with a normal direction uniform in [0, 2*pi). Label 1 =
   convex, 0 = non-convex; each split holds floor(n/2) convex and the rest non-convex examples,
   shuffled. The parameters are the ones given (k ~ Geometric(0.195), >= 19 pixels; 2-4 parts with
   k ~ Geometric(0.07), >= 10 pixels each). Drawn so, non-convex sets carry far more on-pixels
   (about 470 against 273), and the count alone would separate the classes, which the originals
   did not allow. So the sets kept are chosen by their count: both classes follow one histogram of
   on-pixel counts in bins of 8 (``count_matched_sets``), a departure from the originals' procedure
   made to keep their property that no trivial statistic predicts the label.
10. Convexity test. A pixel set is convex when it equals the set of pixel centres inside its
    (continuous) convex hull: lattice convexity, decided exactly in integer arithmetic from each
    row's leftmost and rightmost pixels (``is_lattice_convex``). Every half-plane intersection
    passes it. It is stricter than the pairwise test "no off-pixel centre on a segment between two
    on-pixel centres": a set like {(0,0), (2,1), (1,2)} passes that test but fails this one (its
    hull contains (1,1)), so it would count as non-convex here; in a check of 150 generated
    non-convex examples, all 150 also failed the pairwise test.
"""

import math
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

SIDE = 28
PIXELS = SIDE * SIDE
BENCHMARKS = ("mnist-basic", "mnist-rot", "mnist-bg-rand", "mnist-bg-img", "mnist-rot-bg-img", "rect", "rect-img", "convex")
MNIST_BENCHMARKS = BENCHMARKS[:5]
SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    **{name: (10_000, 2_000, 50_000) for name in MNIST_BENCHMARKS},
    "rect": (1_000, 200, 50_000),
    "rect-img": (10_000, 2_000, 50_000),
    "convex": (6_000, 2_000, 50_000),
}
SPLITS = ("train", "valid", "test")

# (package, loader): skimage.data.<loader>() or sklearn.datasets.load_sample_image(<loader>).
NATURAL_IMAGES = (
    ("skimage", "astronaut"),
    ("skimage", "brick"),
    ("skimage", "camera"),
    ("skimage", "cell"),
    ("skimage", "chelsea"),
    ("skimage", "clock"),
    ("skimage", "coffee"),
    ("skimage", "coins"),
    ("skimage", "grass"),
    ("skimage", "gravel"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "moon"),
    ("skimage", "page"),
    ("skimage", "retina"),
    ("skimage", "rocket"),
    ("skimage", "stereo_motorcycle"),
    ("skimage", "text"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
)
LUMA_709 = np.array([0.2125, 0.7154, 0.0721])
MIN_PATCH_STD = 0.05

RECT_SIDES = (3, 28)
RECT_MIN_SIDE_DIFFERENCE = 3
RECT_IMG_SIDES = (10, 28)
RECT_IMG_AREA = (PIXELS // 4, 3 * PIXELS // 4)
RECT_IMG_MIN_SIDE_DIFFERENCE = 5

CONVEX_PLANES_P, CONVEX_MIN_PIXELS = 0.195, 19
PART_PLANES_P, PART_MIN_PIXELS = 0.07, 10
PARTS_PER_NONCONVEX = (2, 4)
# convex: both classes take their on-pixel counts from one histogram of bins this wide (count_matched_sets).
COUNT_BIN = 8
COUNT_BINS = PIXELS // COUNT_BIN + 1

Split = tuple[np.ndarray, np.ndarray]


def generate(name: str, seed: int, mnist: dict | None = None, sizes: tuple[int, int, int] | None = None) -> dict[str, Split]:
    """Benchmark ``name`` as {"train", "valid", "test"} -> (x float32 [N, 784] in [0, 1], y int64).

    ``mnist`` is ``sda.data.load_mnist()``'s dict, needed for the MNIST variants. ``sizes``
    (train, valid, test) shrinks the set for tests; the procedure is the same.
    """
    splits, _ = generate_with_details(name, seed, mnist, sizes)
    return splits


def generate_with_details(name: str, seed: int, mnist: dict | None = None, sizes: tuple[int, int, int] | None = None):
    """``generate``'s splits, plus per split the hidden variables of each example (to check them).

    Details per dataset: MNIST variants ``source`` (row in the 70,000-digit pool, see
    ``mnist_pool``), rotated ones ``angle``, bg-rand/bg-img ``background``, bg-img
    ``background_image/row/col``; rect ``top/left/height/width``; rect-img also
    ``inside_image/row/col`` and ``outside_image/row/col``; convex ``parts`` (1 for a convex set).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    sizes = check_sizes(SPLIT_SIZES[name] if sizes is None else sizes)
    seed = check_seed(seed)
    if name in MNIST_BENCHMARKS:
        if mnist is None:
            raise ValueError(f"{name} is made from MNIST's digits: pass mnist=sda.data.load_mnist()")
        x, y, details = mnist_variant(name, seed, mnist, sizes)
    elif name == "rect":
        x, y, details = rectangles(seed, sum(sizes))
    elif name == "rect-img":
        x, y, details = image_rectangles(seed, sum(sizes))
    else:
        x, y, details = convex_sets(seed, sizes)
    bounds = np.cumsum((0,) + sizes)
    splits, split_details = {}, {}
    for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:]):
        splits[split] = (x[start:stop], y[start:stop])
        split_details[split] = {key: value[start:stop] for key, value in details.items()}
    return splits, split_details


def check_sizes(sizes) -> tuple[int, int, int]:
    sizes = tuple(int(n) for n in sizes)
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) == 0:
        raise ValueError(f"sizes must be three non-negative counts (train, valid, test), not all 0; got {sizes}")
    return sizes


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def stream(seed: int, purpose: str) -> np.random.Generator:
    """An independent generator per (seed, purpose), so adding a draw for one purpose moves no other."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


# --- MNIST variants -----------------------------------------------------------------------------


def mnist_pool(mnist: dict) -> tuple[np.ndarray, np.ndarray]:
    """All MNIST digits, (x [N, 784], y [N]): the pickle's train, valid and test rows in that order."""
    missing = [split for split in SPLITS if split not in mnist]
    if missing:
        raise ValueError(f"mnist must hold the splits {SPLITS} (as sda.data.load_mnist() returns); missing {missing}")
    x = np.concatenate([np.asarray(mnist[split][0], dtype=np.float32) for split in SPLITS])
    y = np.concatenate([np.asarray(mnist[split][1], dtype=np.int64) for split in SPLITS])
    if x.ndim != 2 or x.shape[1] != PIXELS or len(x) != len(y):
        raise ValueError(f"mnist images must be [N, {PIXELS}] with one label each; got {x.shape} and {y.shape}")
    return x, y


def mnist_sources(seed: int, sizes: tuple[int, int, int], pool_size: int) -> np.ndarray:
    """Pool rows of every example, train then valid then test: the first rows of one permutation.

    Because it is one permutation, the training file (train + valid) and the test set are disjoint.
    """
    total = sum(sizes)
    if total > pool_size:
        raise ValueError(f"{total} examples asked but MNIST has only {pool_size} digits")
    return stream(seed, "mnist-digits").permutation(pool_size)[:total]


def mnist_variant(name: str, seed: int, mnist: dict, sizes: tuple[int, int, int]):
    pool_x, pool_y = mnist_pool(mnist)
    source = mnist_sources(seed, sizes, len(pool_x))
    count = len(source)
    digits, labels = pool_x[source], pool_y[source]
    details = {"source": source}
    if name in ("mnist-rot", "mnist-rot-bg-img"):
        details["angle"] = stream(seed, "rotation-angles").uniform(0.0, 2 * np.pi, count)
        digits = rotate(digits, details["angle"])
    if name == "mnist-bg-rand":
        details["background"] = stream(seed, "background-noise").random((count, PIXELS), dtype=np.float32)
    elif name in ("mnist-bg-img", "mnist-rot-bg-img"):
        rng = stream(seed, "background-images")
        image = rng.integers(0, len(NATURAL_IMAGES), count)
        row, col = sample_patch_positions(rng, image)
        details.update(background=cut_patches(image, row, col), background_image=image, background_row=row, background_col=col)
    if "background" in details:
        digits = composite(digits, details["background"])
    return digits, labels, details


def composite(digits: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
    """The brighter of digit and background at every pixel."""
    return np.maximum(digits, backgrounds).astype(np.float32)


# Offsets of the pixel centres from the image centre, as (row, col), in row-major order.
_CENTRE = (SIDE - 1) / 2
_ROW_OFFSET, _COL_OFFSET = (np.indices((SIDE, SIDE)).reshape(2, PIXELS) - _CENTRE).astype(np.float64)
_PAD = 2


def rotate(images: np.ndarray, angles: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Each image [N, 784] turned counter-clockwise (as displayed) by its angle in radians.

    Bilinear about the image centre, zero outside: output pixel p reads the input at R(-angle) p.
    """
    images = np.asarray(images, dtype=np.float32).reshape(-1, PIXELS)
    angles = np.asarray(angles, dtype=np.float64)
    out = np.empty_like(images)
    padded_side = SIDE + 2 * _PAD
    for start in range(0, len(images), batch):
        chunk = slice(start, start + batch)
        # Zero padding turns out-of-image reads into reads of zeros; clipping the coordinates to
        # the padding keeps far-away reads inside it without changing their (zero) value.
        padded = np.pad(images[chunk].reshape(-1, SIDE, SIDE), ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
        padded = padded.reshape(len(padded), -1)
        cos, sin = np.cos(angles[chunk])[:, None], np.sin(angles[chunk])[:, None]
        # Display coordinates have y up = -row; reading at R(-angle) p gives these source points.
        src_row = _CENTRE + _ROW_OFFSET * cos + _COL_OFFSET * sin
        src_col = _CENTRE + _COL_OFFSET * cos - _ROW_OFFSET * sin
        src_row = np.clip(src_row, -1.5, SIDE + 0.5) + _PAD
        src_col = np.clip(src_col, -1.5, SIDE + 0.5) + _PAD
        row0, col0 = np.floor(src_row), np.floor(src_col)
        down, right = (src_row - row0).astype(np.float32), (src_col - col0).astype(np.float32)
        top_left = row0.astype(np.intp) * padded_side + col0.astype(np.intp)

        def read(offset):
            return np.take_along_axis(padded, top_left + offset, axis=1)

        upper = read(0) * (1 - right) + read(1) * right
        lower = read(padded_side) * (1 - right) + read(padded_side + 1) * right
        out[chunk] = np.clip(upper * (1 - down) + lower * down, 0.0, 1.0)
    return out


# --- natural-image patches ----------------------------------------------------------------------


def load_natural_image(package: str, loader: str) -> np.ndarray:
    """One of ``NATURAL_IMAGES`` as grey float32 [H, W] in [0, 1]; an error if it cannot be had offline."""
    try:
        if package == "skimage":
            import skimage.data

            image = getattr(skimage.data, loader)()
            if loader == "stereo_motorcycle":
                image = image[0]
        elif package == "sklearn":
            from sklearn.datasets import load_sample_image

            image = load_sample_image(loader)
        else:
            raise ValueError(f"unknown image package {package!r}")
    except Exception as error:
        raise RuntimeError(
            f"natural image {package}:{loader} could not be loaded offline ({type(error).__name__}: {error}). "
            "The image backgrounds need scikit-image's and scikit-learn's bundled images; install "
            "scikit-image (the version in requirements.txt)."
        ) from error
    if image.dtype != np.uint8:
        raise RuntimeError(f"natural image {package}:{loader} is {image.dtype}, expected uint8")
    grey = image[..., :3] @ LUMA_709 if image.ndim == 3 else image.astype(np.float64)
    return (grey / 255.0).astype(np.float32)


@lru_cache(maxsize=1)
def natural_images() -> tuple[np.ndarray, ...]:
    """The 20 grey images of ``NATURAL_IMAGES``, in that order (loaded once per process)."""
    return tuple(load_natural_image(package, loader) for package, loader in NATURAL_IMAGES)


@lru_cache(maxsize=1)
def _patch_index():
    """Everything the patch sampler needs: the images flattened end to end, and each image's
    acceptable windows (top-left positions whose 28x28 pixel std is >= MIN_PATCH_STD)."""
    images = natural_images()
    widths = np.array([image.shape[1] for image in images])
    starts = np.cumsum([0] + [image.size for image in images])[:-1]
    acceptable = []
    for image in images:
        # Window sums of x and x^2 from summed-area tables, in float64 so std is exact enough.
        table = np.pad(image.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        squares = np.pad(image.astype(np.float64) ** 2, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

        def window_sum(t):
            return t[SIDE:, SIDE:] - t[:-SIDE, SIDE:] - t[SIDE:, :-SIDE] + t[:-SIDE, :-SIDE]

        mean = window_sum(table) / PIXELS
        variance = np.maximum(window_sum(squares) / PIXELS - mean**2, 0.0)
        positions = np.flatnonzero(np.sqrt(variance) >= MIN_PATCH_STD)
        if positions.size == 0:
            raise RuntimeError(f"no 28x28 window of a natural image has pixel std >= {MIN_PATCH_STD}")
        acceptable.append((positions, mean.shape[1]))
    return np.concatenate([image.ravel() for image in images]), starts, widths, acceptable


def sample_patch_positions(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left (row, col) of one acceptable window of each given image, uniform over its acceptable ones."""
    _, _, _, acceptable = _patch_index()
    counts = np.array([positions.size for positions, _ in acceptable])
    pick = rng.integers(0, counts[image])
    row, col = np.empty(len(image), np.intp), np.empty(len(image), np.intp)
    for index, (positions, window_columns) in enumerate(acceptable):  # 20 images, not per example
        chosen = image == index
        row[chosen], col[chosen] = np.divmod(positions[pick[chosen]], window_columns)
    return row, col


def cut_patches(image: np.ndarray, row: np.ndarray, col: np.ndarray, batch: int = 8192) -> np.ndarray:
    """The 28x28 windows [N, 784] at the given top-left corners of the given images."""
    flat, starts, widths, _ = _patch_index()
    out = np.empty((len(image), PIXELS), np.float32)
    grid_row, grid_col = np.indices((SIDE, SIDE)).reshape(2, PIXELS)
    for start in range(0, len(image), batch):
        chunk = slice(start, start + batch)
        width = widths[image[chunk]][:, None]
        corner = starts[image[chunk]][:, None] + row[chunk][:, None] * width + col[chunk][:, None]
        out[chunk] = flat[corner + grid_row * width + grid_col]
    return out


# --- rectangles ---------------------------------------------------------------------------------


def draw_sides(rng, count, sides, accept, batch=65536):
    """``count`` (height, width) pairs uniform on ``sides`` (inclusive) for which ``accept`` holds."""
    heights, widths, found = [], [], 0
    while found < count:
        height, width = rng.integers(sides[0], sides[1] + 1, (2, batch))
        keep = accept(height, width)
        heights.append(height[keep])
        widths.append(width[keep])
        found += keep.sum()
    return np.concatenate(heights)[:count], np.concatenate(widths)[:count]


def place(rng, height, width):
    """Uniform top-left corners such that each rectangle fits in the image."""
    top = np.floor(rng.random(len(height)) * (SIDE - height + 1)).astype(np.intp)
    left = np.floor(rng.random(len(width)) * (SIDE - width + 1)).astype(np.intp)
    return top, left


def rectangle_masks(top, left, height, width, border_only: bool) -> np.ndarray:
    """Boolean [N, 784]: each rectangle's 1-pixel border, or its border and inside."""
    rows = np.arange(SIDE)[None, :, None]
    cols = np.arange(SIDE)[None, None, :]
    top, left = top[:, None, None], left[:, None, None]
    bottom, right = top + height[:, None, None] - 1, left + width[:, None, None] - 1
    inside = (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
    if border_only:
        inside &= (rows == top) | (rows == bottom) | (cols == left) | (cols == right)
    return inside.reshape(-1, PIXELS)


def rectangles(seed: int, count: int):
    rng = stream(seed, "rect")
    height, width = draw_sides(rng, count, RECT_SIDES, lambda h, w: np.abs(h - w) >= RECT_MIN_SIDE_DIFFERENCE)
    top, left = place(rng, height, width)
    x = rectangle_masks(top, left, height, width, border_only=True).astype(np.float32)
    tall = (height > width).astype(np.int64)
    return x, tall, {"top": top, "left": left, "height": height, "width": width}


def image_rectangles(seed: int, count: int):
    rng = stream(seed, "rect-img")

    def accept(h, w):
        area = h * w
        return (area >= RECT_IMG_AREA[0]) & (area <= RECT_IMG_AREA[1]) & (np.abs(h - w) >= RECT_IMG_MIN_SIDE_DIFFERENCE)

    height, width = draw_sides(rng, count, RECT_IMG_SIDES, accept)
    top, left = place(rng, height, width)
    images = len(NATURAL_IMAGES)
    inside_image = rng.integers(0, images, count)
    outside_image = (inside_image + rng.integers(1, images, count)) % images  # any image but the inside one
    inside_row, inside_col = sample_patch_positions(rng, inside_image)
    outside_row, outside_col = sample_patch_positions(rng, outside_image)
    mask = rectangle_masks(top, left, height, width, border_only=False)
    x = np.where(mask, cut_patches(inside_image, inside_row, inside_col), cut_patches(outside_image, outside_row, outside_col))
    details = {
        "top": top, "left": left, "height": height, "width": width,
        "inside_image": inside_image, "inside_row": inside_row, "inside_col": inside_col,
        "outside_image": outside_image, "outside_row": outside_row, "outside_col": outside_col,
    }
    return x.astype(np.float32), (height > width).astype(np.int64), details


# --- convex and non-convex sets -----------------------------------------------------------------

# Pixel centres as (x = col, y = row), in row-major order.
_PIXEL_XY = np.stack(np.indices((SIDE, SIDE))[::-1]).reshape(2, PIXELS).T.astype(np.float64)


def halfplane_intersections(rng, count: int, planes_p: float, min_pixels: int, batch: int = 4096) -> np.ndarray:
    """``count`` boolean [784] sets: pixels inside k ~ Geometric(planes_p) random half-planes, with
    at least ``min_pixels`` pixels (smaller ones are rejected and drawn again)."""
    found, total = [], 0
    while total < count:
        size = min(batch, 256 + 4 * (count - total))  # small requests (tests) draw small batches
        planes = rng.geometric(planes_p, size)
        most = planes.max()
        through = rng.uniform(-0.5, SIDE - 0.5, (size, most, 2))
        facing = rng.uniform(0.0, 2 * np.pi, (size, most))
        normal = np.stack([np.cos(facing), np.sin(facing)], axis=-1)
        threshold = np.einsum("bkd,bkd->bk", normal, through)
        inside = np.ones((size, PIXELS), bool)
        # Loop over the j-th plane of every set at once; sets already below min_pixels can only
        # shrink further, so they drop out early (they are rejected below all the same).
        pending = np.arange(size)
        for j in range(most):
            pending = pending[planes[pending] > j]
            if pending.size == 0:
                break
            inside[pending] &= normal[pending, j] @ _PIXEL_XY.T >= threshold[pending, j, None]
            pending = pending[inside[pending].sum(1) >= min_pixels]
        keep = inside[inside.sum(1) >= min_pixels]
        found.append(keep)
        total += len(keep)
    return np.concatenate(found)[:count]


def nonconvex_unions(rng, count: int, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``count`` unions of 2-4 small convex sets that fail the convexity test, and their part counts."""
    found, found_parts, total = [], [], 0
    while total < count:
        size = min(batch, 64 + 2 * (count - total))
        parts = rng.integers(PARTS_PER_NONCONVEX[0], PARTS_PER_NONCONVEX[1] + 1, size)
        pieces = halfplane_intersections(rng, parts.sum(), PART_PLANES_P, PART_MIN_PIXELS)
        unions = np.logical_or.reduceat(pieces, np.cumsum(parts) - parts, axis=0)
        keep = ~is_lattice_convex(unions)
        found.append(unions[keep])
        found_parts.append(parts[keep])
        total += keep.sum()
    return np.concatenate(found)[:count], np.concatenate(found_parts)[:count]


# Triples (i, y, j) with i <= y <= j over the rows, sorted by y, for the row envelopes below. When
# i == j the "interpolation" is the point itself: weight 1 on i.
_I, _Y, _J = (a.ravel() for a in np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"))
_ORDER = np.flatnonzero((_I <= _Y) & (_Y <= _J))
_ORDER = _ORDER[np.argsort(_Y[_ORDER], kind="stable")]
_I, _Y, _J = _I[_ORDER], _Y[_ORDER], _J[_ORDER]
_WEIGHT_I = np.where(_I == _J, 1, _J - _Y)
_WEIGHT_J = np.where(_I == _J, 0, _Y - _I)
_SPAN = np.maximum(_J - _I, 1)
_ROW_STARTS = np.searchsorted(_Y, np.arange(SIDE))
_FAR = 10**6  # "no pixel in this row": far enough that no interpolation through it reaches the image


def is_lattice_convex(sets: np.ndarray, batch: int = 512) -> np.ndarray:
    """For boolean sets [N, 784]: does each equal the pixel centres inside its convex hull?

    The hull's left edge at row y is the lower convex envelope of the rows' leftmost pixels,
    min over rows i <= y <= j of the interpolation between row i's and row j's leftmost pixel (and
    likewise the right edge from the rightmost ones). Taking ceil (floor) of each interpolation in
    integers gives the first (last) pixel column inside the hull exactly. The set is convex when
    every row is exactly that run of pixels.
    """
    sets = np.asarray(sets, dtype=bool).reshape(-1, SIDE, SIDE)
    result = np.empty(len(sets), bool)
    columns = np.arange(SIDE)
    for start in range(0, len(sets), batch):
        grid = sets[start : start + batch]
        occupied = grid.any(2)
        leftmost = np.where(occupied, grid.argmax(2), _FAR)
        rightmost = np.where(occupied, SIDE - 1 - grid[:, :, ::-1].argmax(2), -_FAR)
        left_num = leftmost[:, _I] * _WEIGHT_I + leftmost[:, _J] * _WEIGHT_J
        right_num = rightmost[:, _I] * _WEIGHT_I + rightmost[:, _J] * _WEIGHT_J
        first = np.minimum.reduceat(-(-left_num // _SPAN), _ROW_STARTS, axis=1)
        last = np.maximum.reduceat(right_num // _SPAN, _ROW_STARTS, axis=1)
        hull = (columns >= first[:, :, None]) & (columns <= last[:, :, None])
        result[start : start + batch] = (hull == grid).all((1, 2))
    return result


def convex_sets(seed: int, sizes: tuple[int, int, int]):
    labels_rng = stream(seed, "convex-labels")
    labels = np.concatenate([labels_rng.permutation(np.arange(n) < n // 2) for n in sizes]).astype(np.int64)
    convex = labels == 1
    x = np.empty((len(labels), PIXELS), np.float32)
    parts = np.ones(len(labels), np.int64)
    x[convex], x[~convex], parts[~convex] = count_matched_sets(seed, convex.sum(), (~convex).sum())
    return x, labels, {"parts": parts}


def count_matched_sets(seed: int, n_convex: int, n_nonconvex: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convex sets, non-convex sets and their part counts, both classes with one distribution of on-pixel counts.

    Drawn as given, non-convex unions carry about 470 on-pixels against 273 for convex sets, so the
    count alone would tell the classes apart. So both are drawn in batches and sorted into bins of
    COUNT_BIN on-pixels; a bin yields as many (convex, non-convex) pairs as the scarcer class has
    there, in the order drawn, and batches are drawn until the bins yield enough pairs. The pairs
    are then shuffled and the first ones kept. Both classes thus follow the same count histogram,
    min(convex, non-convex) over the bins: each set is still drawn as defined, only which ones are
    kept is chosen by their count.
    """
    needed = max(n_convex, n_nonconvex)
    convex_rng, nonconvex_rng = stream(seed, "convex-sets"), stream(seed, "nonconvex-sets")
    convex, nonconvex, parts = [], [], []
    batch = 2 * needed + 256
    while True:
        convex.append(halfplane_intersections(convex_rng, batch, CONVEX_PLANES_P, CONVEX_MIN_PIXELS))
        unions, union_parts = nonconvex_unions(nonconvex_rng, batch)
        nonconvex.append(unions)
        parts.append(union_parts)
        convex_bins = np.concatenate(convex).sum(1) // COUNT_BIN
        nonconvex_bins = np.concatenate(nonconvex).sum(1) // COUNT_BIN
        available = np.minimum(np.bincount(convex_bins, minlength=COUNT_BINS), np.bincount(nonconvex_bins, minlength=COUNT_BINS))
        if available.sum() >= needed:
            break
        batch = needed + 256
    pairs = [(np.flatnonzero(convex_bins == b)[:m], np.flatnonzero(nonconvex_bins == b)[:m]) for b, m in enumerate(available) if m]
    convex_rows = np.concatenate([c for c, _ in pairs])
    nonconvex_rows = np.concatenate([n for _, n in pairs])
    order = stream(seed, "convex-pairs").permutation(len(convex_rows))[:needed]
    convex_rows, nonconvex_rows = convex_rows[order], nonconvex_rows[order]
    return (np.concatenate(convex)[convex_rows[:n_convex]], np.concatenate(nonconvex)[nonconvex_rows[:n_nonconvex]],
            np.concatenate(parts)[nonconvex_rows[:n_nonconvex]])


# --- looking at the data ------------------------------------------------------------------------


def gallery(x: np.ndarray, y: np.ndarray, path, n: int = 64, columns: int = 8, scale: int = 3) -> Path:
    """A PNG grid of the first ``n`` square images, each captioned with its label, and a sidecar
    ``<path>.labels.txt`` with the labels row by row. Returns the PNG's path."""
    from PIL import Image, ImageDraw

    from sda.artifacts import atomic_path, save_text

    path = Path(path)
    x, y = np.asarray(x)[:n], np.asarray(y)[:n]
    side = math.isqrt(x.shape[1])
    rows = -(-len(x) // columns)
    cell, caption = max(side * scale, 24), 12
    sheet = Image.new("L", (columns * (cell + 2), rows * (cell + caption + 2)), color=128)
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(zip(x, y)):
        pixels = np.clip(np.asarray(image).reshape(side, side) * 255 + 0.5, 0, 255).astype(np.uint8)
        tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
        left, top = (index % columns) * (cell + 2) + 1, (index // columns) * (cell + caption + 2) + 1
        sheet.paste(tile, (left, top))
        draw.text((left + 2, top + cell), str(int(label)), fill=255)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    lines = [" ".join(str(int(label)) for label in y[start : start + columns]) for start in range(0, len(y), columns)]
    save_text(path.with_suffix(".labels.txt"), "\n".join(lines) + "\n")
    return path
