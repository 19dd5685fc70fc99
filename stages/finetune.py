"""Stage finetune: stack every pretrained encoder under a softmax layer and train the whole network.

Early stopping on the validation error; the test split is never read here. Writes
models/finetuned/weights.pt (the best-validation state), metrics/finetune.json and the per-epoch
curves plots/finetune.csv.
"""

import time
from pathlib import Path

import torch

from sda.artifacts import load_state, save_json, save_state, save_text
from sda.dae import DenoisingAutoencoder
from sda.finetune import EarlyStopping, finetune
from sda.kernels import describe_cpu_kernels
from sda.stacked import StackedClassifier
from stages.common import describe_device, load_splits, run, setup_torch, stage_generator, stage_parser
from stages.environment import save_computed_by
from stages.params import PREPARED_DIR, load_params, model_dir

MODEL_PATH = Path("models/finetuned/weights.pt")
CURVE_COLUMNS = ("epoch", "lr", "train_loss", "train_error", "valid_error")


def load_autoencoder(layer: str, device: torch.device) -> DenoisingAutoencoder:
    path = model_dir(layer) / "weights.pt"
    state = load_state(path, device)
    if set(state) != {"weight", "hidden_bias", "visible_bias"}:
        raise ValueError(f"{path}: not a denoising autoencoder state (keys {sorted(state)})")
    n_hidden, n_visible = state["weight"].shape
    dae = DenoisingAutoencoder(n_visible, n_hidden).to(device)
    dae.load_state_dict(state)
    return dae


def main() -> None:
    parser = stage_parser(__doc__)
    args = parser.parse_args()
    params = load_params(args.params)
    ft = params.finetune
    device = setup_torch(args.device)

    splits = load_splits(PREPARED_DIR, device)
    daes = [load_autoencoder(layer.name, device) for layer in params.layers]
    n_classes = int(splits["train"][1].max().item()) + 1
    model = StackedClassifier.from_autoencoders(daes, n_classes).to(device)
    stopping = EarlyStopping(ft.patience, ft.patience_increase, ft.improvement_threshold)
    print(f"finetune: {' -> '.join(map(str, [daes[0].n_visible] + [d.n_hidden for d in daes]))} -> {n_classes}, {params.engine} engine, on {describe_device(device, describe_cpu_kernels(device))}")

    started = time.perf_counter()
    result = finetune(
        model, splits["train"], splits["valid"], ft.lr, ft.batch_size, ft.max_epochs, stopping,
        stage_generator(params.seed, "finetune", device), momentum=ft.momentum, lr_decay=ft.lr_decay,
        engine=params.engine,
    )
    seconds = time.perf_counter() - started

    save_state(MODEL_PATH, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    rows = [",".join(CURVE_COLUMNS)] + [
        f"{r.epoch},{r.lr:.6g},{r.train_loss:.6f},{r.train_error:.6f},{r.valid_error:.6f}" for r in result.history
    ]
    save_text("plots/finetune.csv", "\n".join(rows) + "\n")
    save_json("metrics/finetune.json", {
        "best_epoch": result.best_epoch,
        "best_valid_error": result.best_valid_error,
        "epochs_run": len(result.history),
        "seconds": round(seconds, 2),
    })
    save_computed_by("finetune", device, params.engine)
    print(f"finetune: best valid error {result.best_valid_error:.4%} at epoch {result.best_epoch} of {len(result.history)}, {seconds:.0f}s")


if __name__ == "__main__":
    run(main)
