"""Stage evaluate: error rates of the fine-tuned (best-validation) network, with 95% CIs.

Writes metrics/evaluate.json: valid and test error, the half-width of each 95% CI, and the final
reconstruction losses of every pretrained layer, for `dvc metrics show`.
"""

import json
from pathlib import Path

import torch

from sda.artifacts import load_state, save_json
from sda.metrics import confidence_interval_95
from sda.stacked import StackedClassifier
from stages.common import load_splits, run, setup_torch, stage_parser
from stages.environment import save_computed_by
from stages.finetune import MODEL_PATH
from stages.params import PREPARED_DIR, load_params


def load_classifier(path: Path, device: torch.device) -> StackedClassifier:
    state = load_state(path, device)
    sizes = [state[f"encoders.{i}.weight"].shape[1] for i in range(len(state) // 2 - 1)]
    sizes.append(state["output.weight"].shape[1])
    model = StackedClassifier(sizes, state["output.weight"].shape[0]).to(device)
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = load_params(args.params)
    device = setup_torch(args.device)
    splits = load_splits(PREPARED_DIR, device)
    model = load_classifier(MODEL_PATH, device)

    metrics = {}
    for name in ("valid", "test"):
        x, y = splits[name]
        error = model.error_rate(x, y)
        metrics[f"{name}_error"] = error
        metrics[f"{name}_error_ci95"] = confidence_interval_95(error, x.shape[0])
        metrics[f"{name}_examples"] = x.shape[0]
    for layer in params.layers:
        recorded = json.loads(Path(f"metrics/pretrain/{layer.name}.json").read_text())
        metrics[f"{layer.name}_train_loss"] = recorded["train_loss"]
    save_json("metrics/evaluate.json", metrics)
    save_computed_by("evaluate", device, None)
    print(f"test error {metrics['test_error']:.2%} +- {metrics['test_error_ci95']:.2%} (95% CI), "
          f"valid error {metrics['valid_error']:.2%}")


if __name__ == "__main__":
    run(main)
