"""Stage pretrain@layerN: train one denoising autoencoder on the previous layer's clean codes.

Writes models/pretrain/<layer>/weights.pt (and filters.png for layer1), the clean codes of every
split for the next layer in data/codes/<layer>/, metrics/pretrain/<layer>.json and the per-epoch
loss curve plots/pretrain/<layer>.csv. The layer's noise, loss and emphasis come from its params
section; its losses (train and clean validation) are of its own loss kind, the training loss
emphasised as it was trained.
"""

import time
from pathlib import Path

import torch

from sda.artifacts import save_json, save_split, save_state, save_text
from sda.dae import DenoisingAutoencoder, Emphasis
from sda.filters import filter_grid, save_png
from sda.kernels import describe_cpu_kernels
from sda.noise import Noise, make_noise
from sda.pretrain import encode, pretrain_layer, reconstruction_loss
from stages.common import SPLITS, describe_device, load_splits, run, setup_torch, stage_generator, stage_parser
from stages.environment import save_computed_by
from stages.params import codes_dir, load_params, model_dir


def describe_objective(noise: Noise, loss: str, emphasis: Emphasis) -> str:
    """What the layer is trained to do, for the log: the noise, then the loss and emphasis where not the plain cross-entropy.

    ``MaskingNoise(nu=0.1, mode='fixed')``; ``SaltPepperNoise(nu=0.25), emphasis alpha=1 beta=0.5``;
    ``GaussianNoise(sigma=0.3), squared_error loss``.
    """
    parts = [str(noise)]
    if loss != "cross_entropy":
        parts.append(f"{loss} loss")
    if not emphasis.is_plain:
        parts.append(str(emphasis))
    return ", ".join(parts)


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("layer", help="the params.yaml section to train: layer1, layer2, ...")
    args = parser.parse_args()
    params = load_params(args.params)
    layer = params.layer(args.layer)
    noise = make_noise(layer.noise, nu=layer.corruption, masking=layer.masking, sigma=layer.sigma)
    emphasis = Emphasis(*layer.emphasis)
    device = setup_torch(args.device)

    splits = load_splits(layer.input, device)
    generator = stage_generator(params.seed, f"pretrain.{layer.name}", device)
    x_train = splits["train"][0]
    # The initial weights depend on the seed and the layer only, never on nu: the filter figure
    # compares corruption levels from the same initialisation. Drawn on the CPU for every device.
    init = torch.Generator().manual_seed(generator.initial_seed())
    dae = DenoisingAutoencoder(x_train.shape[1], layer.units, generator=init).to(device)
    print(f"{layer.name}: {x_train.shape[1]} -> {layer.units} units, {describe_objective(noise, layer.loss, emphasis)}, {layer.epochs} epochs, {params.engine} engine, on {describe_device(device, describe_cpu_kernels(device))}", flush=True)

    started = time.perf_counter()
    losses = pretrain_layer(
        dae, x_train, noise, layer.epochs, layer.lr, layer.batch_size, generator, name=f"pretrain.{layer.name}",
        engine=params.engine, loss=layer.loss, emphasis=emphasis,
    )
    seconds = time.perf_counter() - started

    codes = {name: encode(dae, x) for name, (x, _) in splits.items()}
    metrics = {
        "epochs": layer.epochs,
        # Last epoch's mean loss on corrupted inputs; untrained (0 epochs): the clean loss.
        "train_loss": losses[-1] if losses else reconstruction_loss(dae, x_train, kind=layer.loss),
        "valid_clean_reconstruction": reconstruction_loss(dae, splits["valid"][0], kind=layer.loss),
        "seconds": round(seconds, 2),
        "examples_per_second": round(layer.epochs * x_train.shape[0] / seconds, 1) if layer.epochs else 0.0,
    }
    out = model_dir(layer.name)
    save_state(out / "weights.pt", {k: v.detach().cpu() for k, v in dae.state_dict().items()})
    if layer.name == "layer1":  # upper layers read codes, not images: no picture to draw
        save_png(filter_grid(dae.weight), out / "filters.png")
    for name in SPLITS:
        save_split(Path(codes_dir(layer.name)) / f"{name}.npz", codes[name].cpu().numpy(), splits[name][1].cpu().numpy())
    save_text(Path("plots/pretrain") / f"{layer.name}.csv", "epoch,loss\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(losses, 1)))
    save_json(Path("metrics/pretrain") / f"{layer.name}.json", metrics)
    save_computed_by(f"pretrain@{layer.name}", device, params.engine)
    print(f"{layer.name}: train loss {metrics['train_loss']:.4f}, clean valid reconstruction {metrics['valid_clean_reconstruction']:.4f}, {seconds:.1f}s")


if __name__ == "__main__":
    run(main)
