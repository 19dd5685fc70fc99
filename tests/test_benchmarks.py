import socket

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial import ConvexHull, QhullError

from sda import generators
from sda.generators import BENCHMARKS, MIN_PATCH_STD, SPLIT_SIZES, generate, generate_with_details

SMALL = (200, 50, 200)
MNIST_ONLY = set(generators.MNIST_BENCHMARKS)


@pytest.fixture(scope="module")
def mnist():
    from sda.data import load_mnist

    return load_mnist()


def needs_mnist(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in MNIST_ONLY else name


def images_of(x):
    return x.reshape(-1, 28, 28)


def test_split_sizes_are_the_originals():
    assert set(SPLIT_SIZES) == set(BENCHMARKS) and len(BENCHMARKS) == 8
    for name in generators.MNIST_BENCHMARKS:
        assert SPLIT_SIZES[name] == (10_000, 2_000, 50_000)
    assert SPLIT_SIZES["rect"] == (1_000, 200, 50_000)
    assert SPLIT_SIZES["rect-img"] == (10_000, 2_000, 50_000)
    assert SPLIT_SIZES["convex"] == (6_000, 2_000, 50_000)


def test_bad_arguments_are_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match="mnist-rot-bg-img.*rect-img.*convex"):
        generate("mnist-rotated", 0)
    with pytest.raises(ValueError, match="seed"):
        generate("rect", -1, sizes=SMALL)
    with pytest.raises(ValueError, match="sizes"):
        generate("rect", 0, sizes=(10, 10))


@pytest.mark.parametrize("name", [needs_mnist(name) for name in BENCHMARKS])
def test_splits_are_sized_scaled_and_reproducible(name, request):
    data = request.getfixturevalue("mnist") if name in MNIST_ONLY else None
    first, again, other = (generate(name, seed, data, sizes=SMALL) for seed in (3, 3, 4))
    for split, size in zip(("train", "valid", "test"), SMALL):
        x, y = first[split]
        assert x.shape == (size, 784) and y.shape == (size,)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.tobytes() == again[split][0].tobytes() and y.tobytes() == again[split][1].tobytes()
        assert x.tobytes() != other[split][0].tobytes()
    classes = 10 if name in MNIST_ONLY else 2
    assert set(np.unique(first["train"][1])) == set(range(classes))


def test_default_sizes_are_the_originals():
    splits = generate("rect", 0)
    assert tuple(len(splits[split][1]) for split in ("train", "valid", "test")) == SPLIT_SIZES["rect"]


def test_rect_labels_agree_with_the_rectangle_measured_from_the_pixels():
    splits = generate("rect", 7, sizes=SMALL)
    x = np.concatenate([splits[s][0] for s in splits])
    y = np.concatenate([splits[s][1] for s in splits])
    assert set(np.unique(x)) == {0.0, 1.0}
    for image, label in zip(images_of(x), y):
        rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
        top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
        height, width = bottom - top + 1, right - left + 1
        outline = np.zeros((28, 28))
        outline[top : bottom + 1, [left, right]] = 1
        outline[[top, bottom], left : right + 1] = 1
        assert np.array_equal(image, outline), "not exactly one rectangle outline"
        assert abs(height - width) >= 3
        assert label == int(height > width)
    assert 0.3 < y.mean() < 0.7


def window(image_index, row, col):
    return generators.natural_images()[image_index][row : row + 28, col : col + 28]


def test_rect_img_shows_one_image_inside_and_another_outside():
    splits, details = generate_with_details("rect-img", 11, sizes=SMALL)
    for split in splits:
        x, y = splits[split]
        d = details[split]
        for i, image in enumerate(images_of(x)):
            top, left, height, width = d["top"][i], d["left"][i], d["height"][i], d["width"][i]
            assert 196 <= height * width <= 588 and min(height, width) >= 10 and abs(height - width) >= 5
            assert y[i] == int(height > width)
            assert d["inside_image"][i] != d["outside_image"][i]
            inside = window(d["inside_image"][i], d["inside_row"][i], d["inside_col"][i])
            outside = window(d["outside_image"][i], d["outside_row"][i], d["outside_col"][i])
            assert inside.std() >= MIN_PATCH_STD - 1e-6 and outside.std() >= MIN_PATCH_STD - 1e-6
            box = np.zeros((28, 28), bool)
            box[top : top + height, left : left + width] = True
            assert np.array_equal(image[box], inside[box]) and np.array_equal(image[~box], outside[~box])


def independent_convexity(image):
    """Lattice convexity by scipy's Qhull: is every pixel centre inside the hull an on-pixel?"""
    on = np.argwhere(image)
    if len(on) == 0:
        return True
    try:
        hull = ConvexHull(on.astype(float))
    except QhullError:  # all on-pixels collinear: the hull is the segment between the extremes
        ends = on[np.lexsort(on.T[::-1])][[0, -1]]
        step = ends[1] - ends[0]
        count = np.gcd(*step)
        if count == 0:
            return len(on) == 1
        segment = ends[0] + np.arange(count + 1)[:, None] * (step // count)
        return {tuple(p) for p in segment} == {tuple(p) for p in on}
    centres = np.argwhere(np.ones((28, 28), bool)).astype(float)
    in_hull = (centres @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(1)
    return np.array_equal(in_hull, image.ravel())


def test_convex_labels_agree_with_an_independent_hull_check():
    splits, details = generate_with_details("convex", 5, sizes=SMALL)
    for split, size in zip(splits, SMALL):
        x, y = splits[split]
        assert y.sum() == size // 2
        pixels = (x > 0).sum(1)
        assert set(np.unique(x)) == {0.0, 1.0}
        assert (pixels[y == 1] >= 19).all() and (pixels[y == 0] >= 10).all()
        assert (details[split]["parts"][y == 1] == 1).all()
        assert set(np.unique(details[split]["parts"][y == 0])) <= {2, 3, 4}
        verdicts = np.array([independent_convexity(image > 0) for image in images_of(x)])
        assert np.array_equal(verdicts, y == 1)


def test_lattice_convexity_on_known_shapes():
    def shape(*pixels):
        image = np.zeros((28, 28), bool)
        for row, col in pixels:
            image[row, col] = True
        return image.ravel()

    square = np.zeros((28, 28), bool)
    square[3:9, 4:20] = True
    ell = square.copy()
    ell[3:6, 10:20] = False
    cases = {
        "empty": (shape(), True),
        "square": (square.ravel(), True),
        "L": (ell.ravel(), False),
        "diagonal": (shape((0, 0), (1, 1), (2, 2), (3, 3)), True),
        "gap in a row": (shape((5, 1), (5, 3)), False),
        "thin triangle around (1,1)": (shape((0, 0), (2, 1), (1, 2)), False),
        "knight move": (shape((0, 0), (1, 2)), True),
    }
    verdicts = generators.is_lattice_convex(np.stack([image for image, _ in cases.values()]))
    for (label, (image, expected)), verdict in zip(cases.items(), verdicts):
        assert verdict == expected == independent_convexity(image.reshape(28, 28)), label


def test_natural_images_load_offline_as_twenty_distinct_grey_images(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network use attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    generators.natural_images.cache_clear()
    generators._patch_index.cache_clear()
    images = generators.natural_images()
    assert len(images) == len(generators.NATURAL_IMAGES) == 20
    fingerprints = set()
    for image in images:
        assert image.ndim == 2 and image.dtype == np.float32 and min(image.shape) >= 28
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        fingerprints.add((image.shape, round(float(image.mean()), 6)))
    assert len(fingerprints) == 20


def test_an_unavailable_image_is_an_error_naming_it():
    with pytest.raises(RuntimeError, match="skimage:no_such_picture"):
        generators.load_natural_image("skimage", "no_such_picture")


def test_gallery_writes_a_grid_and_its_labels(tmp_path):
    from PIL import Image

    x, y = generate("rect", 0, sizes=SMALL)["train"]
    path = generators.gallery(x, y, tmp_path / "rect.png", n=20, columns=8)
    assert Image.open(path).size[0] == 8 * (28 * 3 + 2)
    lines = path.with_suffix(".labels.txt").read_text().split("\n")
    assert lines[0].split() == [str(v) for v in y[:8]] and len([line for line in lines if line]) == 3


# --- MNIST variants -----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_valid_and_test_digits_are_disjoint_and_basic_is_untransformed(mnist):
    pool_x, pool_y = generators.mnist_pool(mnist)
    assert len(pool_x) == 70_000
    full = generators.mnist_sources(0, SPLIT_SIZES["mnist-basic"], len(pool_x))
    assert len(np.unique(full)) == 62_000
    assert not set(full[:12_000]) & set(full[12_000:])

    splits, details = generate_with_details("mnist-basic", 1, mnist, sizes=SMALL)
    training_file = np.concatenate([details["train"]["source"], details["valid"]["source"]])
    assert not set(training_file) & set(details["test"]["source"])
    assert len(np.unique(training_file)) == len(training_file)
    for split in splits:
        x, y = splits[split]
        source = details[split]["source"]
        assert np.array_equal(x, pool_x[source]) and np.array_equal(y, pool_y[source])


def scipy_rotation(digits, angles):
    return np.stack(
        [
            ndimage.rotate(d.reshape(28, 28), np.degrees(a), reshape=False, order=1, mode="grid-constant").ravel()
            for d, a in zip(digits, angles)
        ]
    )


@pytest.mark.slow
def test_rotated_digits_are_rotations_of_real_digits(mnist):
    pool_x, pool_y = generators.mnist_pool(mnist)
    splits, details = generate_with_details("mnist-rot", 2, mnist, sizes=SMALL)
    x, y = splits["train"]
    source, angle = details["train"]["source"], details["train"]["angle"]
    assert np.array_equal(y, pool_y[source])
    assert (angle >= 0).all() and (angle < 2 * np.pi).all() and angle.std() > 1.5
    np.testing.assert_allclose(x, scipy_rotation(pool_x[source], angle), atol=1e-5)
    # Turning back by the angle recovers the source digit, up to the blur of two interpolations.
    back = generators.rotate(x, -angle)
    correlation = [np.corrcoef(b, s)[0, 1] for b, s in zip(back, pool_x[source])]
    assert min(correlation) > 0.9


@pytest.mark.slow
def test_random_backgrounds_are_uniform_and_digits_untouched(mnist):
    pool_x, _ = generators.mnist_pool(mnist)
    splits, details = generate_with_details("mnist-bg-rand", 3, mnist, sizes=SMALL)
    x = splits["train"][0]
    digit = pool_x[details["train"]["source"]]
    ink = digit > 0
    assert np.array_equal(x, np.maximum(digit, details["train"]["background"]))
    background = x[~ink]
    assert stats.kstest(background, "uniform").pvalue > 1e-3
    assert abs(background.mean() - 0.5) < 0.01 and abs(background.var() - 1 / 12) < 0.005


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-bg-img", "mnist-rot-bg-img"])
def test_image_backgrounds_are_textured_patches_behind_the_digit(mnist, name):
    pool_x, _ = generators.mnist_pool(mnist)
    splits, details = generate_with_details(name, 4, mnist, sizes=SMALL)
    for split in splits:
        x, d = splits[split][0], details[split]
        digit = pool_x[d["source"]]
        if name == "mnist-rot-bg-img":
            digit = scipy_rotation(digit, d["angle"])
        patches = np.stack(
            [window(i, r, c).ravel() for i, r, c in zip(d["background_image"], d["background_row"], d["background_col"])]
        )
        assert (patches.std(1) >= MIN_PATCH_STD - 1e-6).all()
        assert len(np.unique(d["background_image"])) > 10
        np.testing.assert_allclose(x, np.maximum(digit, patches), atol=1e-5)
        # Where the digit has no ink the patch shows through untouched.
        clear = digit == 0
        assert np.array_equal(x[clear], patches[clear])


def threshold_accuracy(train, test) -> float:
    """Test accuracy of the best rule "label = (statistic > t)" or its reverse, t and direction fitted on train."""
    (s_train, y_train), (s_test, y_test) = train, test
    order = np.argsort(s_train, kind="stable")
    s_sorted, y_sorted = s_train[order], y_train[order]
    # Accuracy of "1 above t" for t between consecutive sorted values: ones above plus zeros at or below.
    ones_above = y_sorted.sum() - np.concatenate([[0], np.cumsum(y_sorted)])
    zeros_below = np.concatenate([[0], np.cumsum(1 - y_sorted)])
    accuracy = (ones_above + zeros_below) / len(y_sorted)
    best = int(np.argmax(np.maximum(accuracy, 1 - accuracy)))
    threshold = -np.inf if best == 0 else s_sorted[best - 1]
    predicted = (s_test > threshold).astype(np.int64)
    if accuracy[best] < 0.5:
        predicted = 1 - predicted
    return float((predicted == y_test).mean())


@pytest.mark.parametrize("name", ["convex", "rect", "rect-img"])
def test_the_summed_intensity_alone_predicts_no_label(name):
    """The on-pixel count (summed intensity for rect-img) classifies no better than chance + 5 points,
    as with the originals: a classifier must learn the shapes."""
    splits = generate(name, 11, sizes=(3000, 10, 3000))
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    chance = max(y_test.mean(), 1 - y_test.mean())
    accuracy = threshold_accuracy((x_train.sum(1), y_train), (x_test.sum(1), y_test))
    assert accuracy <= chance + 0.05, f"{name}: summed intensity alone gives {accuracy:.1%} against chance {chance:.1%}"


def test_the_rule_finds_a_cue_where_there_is_one():
    # The check above could pass by a broken rule: on data whose count does carry the label, it must see it.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    counts = rng.normal(273 + 200 * y, 80)
    assert threshold_accuracy((counts[:2000], y[:2000]), (counts[2000:], y[2000:])) > 0.85


def test_convex_classes_share_one_histogram_of_on_pixel_counts():
    x, y = generate("convex", 5, sizes=(1000, 10, 10))["train"]
    counts = x.sum(1).astype(np.int64) // generators.COUNT_BIN
    convex_hist = np.bincount(counts[y == 1], minlength=generators.COUNT_BINS)
    nonconvex_hist = np.bincount(counts[y == 0], minlength=generators.COUNT_BINS)
    assert np.array_equal(convex_hist, nonconvex_hist)
