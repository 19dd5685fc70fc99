"""Stage prepare: write data/prepared/{train,valid,test}.npz for the dataset in params.yaml.

Also draws plots/gallery/train.png: the first 64 training examples with their labels.
"""

from pathlib import Path

from sda.artifacts import save_split
from sda.data import load_dataset
from sda.generators import gallery
from stages.common import SPLITS, run, stage_parser
from stages.params import PREPARED_DIR, load_params


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", default=PREPARED_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--gallery", default="plots/gallery", help="gallery directory (default: %(default)s)")
    args = parser.parse_args()
    params = load_params(args.params)
    splits = load_dataset(params.dataset, params.seed)
    for name in SPLITS:
        x, y = splits[name]
        save_split(Path(args.out) / f"{name}.npz", x, y)
        print(f"{params.dataset} {name}: {x.shape[0]} examples of {x.shape[1]} values")
    gallery(*splits["train"], Path(args.gallery) / "train.png")


if __name__ == "__main__":
    run(main)
