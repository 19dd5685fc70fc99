"""Generation time of each benchmark dataset at full size, and a gallery of each.

    python bench/bench_datasets.py [--gallery-dir docs/datasets] [--seed 1234]

Loads MNIST and the natural images once (timed separately), then generates the eight datasets one
after another and prints seconds per dataset.
"""

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sda import generators  # noqa: E402
from sda.data import load_mnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-dir", help="write <dir>/<dataset>.png (first 64 training examples)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    started = time.perf_counter()
    mnist = load_mnist()
    generators.natural_images()
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"{'loading MNIST and the 20 images':<34}{time.perf_counter() - started:>7.1f} s")
    for name in generators.BENCHMARKS:
        started = time.perf_counter()
        splits = generators.generate(name, args.seed, mnist)
        seconds = time.perf_counter() - started
        sizes = "/".join(str(len(splits[s][1])) for s in ("train", "valid", "test"))
        print(f"{name:<20}{sizes:<14}{seconds:>7.1f} s")
        if args.gallery_dir:
            generators.gallery(*splits["train"], Path(args.gallery_dir) / f"{name}.png")


if __name__ == "__main__":
    main()
