"""params.yaml: the user-facing contract, read and validated before any stage does work.

Every error is a ParamsError whose message names the key and what is allowed, so a typo stops a
stage at once instead of after twenty minutes of training.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from sda.dae import RECONSTRUCTION_LOSSES
from sda.data import DATASETS
from sda.noise import MASKING_MODES, NOISE_KINDS
from sda.training import ENGINES

PREPARED_DIR = "data/prepared"


def codes_dir(layer: str) -> str:
    return f"data/codes/{layer}"


def model_dir(layer: str) -> Path:
    return Path("models/pretrain") / layer


class ParamsError(ValueError):
    """params.yaml is malformed or holds a value out of range."""


@dataclass(frozen=True)
class LayerParams:
    name: str  # layer1, layer2, ...
    input: str  # directory of the clean codes this layer is trained on
    units: int
    corruption: float | None  # nu: fraction of input components corrupted (masking, salt_pepper); None for gaussian
    masking: str | None  # fixed | bernoulli, for masking noise; None for the others
    epochs: int
    lr: float
    batch_size: int
    noise: str = "masking"  # masking | gaussian | salt_pepper (sda/noise.py)
    sigma: float | None = None  # std of gaussian noise; None for the others
    emphasis: tuple[float, float] = (1.0, 1.0)  # (alpha, beta): loss weight of corrupted / other components
    loss: str = "cross_entropy"  # cross_entropy | squared_error, against the clean input


@dataclass(frozen=True)
class FinetuneParams:
    lr: float
    momentum: float
    lr_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    patience_increase: float
    improvement_threshold: float


@dataclass(frozen=True)
class Params:
    seed: int
    dataset: str
    layers: tuple[LayerParams, ...]
    finetune: FinetuneParams
    engine: str = "fused"  # what runs the training steps (sda/training.py)

    def layer(self, name: str) -> LayerParams:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ParamsError(f"pretrain.{name}: no such layer; params.yaml defines {', '.join(l.name for l in self.layers)}")


def _mapping(value, key: str, keys: set[str]) -> dict:
    if not isinstance(value, dict):
        raise ParamsError(f"{key}: must be a mapping with keys {sorted(keys)}, got {type(value).__name__}")
    return value


def _section(value, key: str, allowed: set[str], optional: set[str] = frozenset()) -> dict:
    """``value`` checked to be a mapping with every key of ``allowed``, and no key outside ``allowed`` and ``optional``."""
    value = _mapping(value, key, allowed)
    missing = sorted(allowed - value.keys())
    if missing:
        raise ParamsError(f"{key}.{missing[0]}: missing (required keys: {', '.join(sorted(allowed))})")
    unknown = sorted(set(value) - allowed - optional)
    if unknown:
        raise ParamsError(f"{key}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed | optional))})")
    return value


def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamsError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ParamsError(f"{key}: must be an integer >= {minimum}, got {value}")
    return value


def _number(value, key: str, low: float, high: float, low_open: bool, high_open: bool) -> float:
    lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
    allowed = f"a number in {lo}, {hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamsError(f"{key}: must be {allowed}, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        raise ParamsError(f"{key}: must be {allowed}, got {value:g}")
    return value


def _choice(value, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ParamsError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


INF = float("inf")
LAYER_KEYS = {"input", "units", "epochs", "lr", "batch_size"}  # every layer's, whatever its noise
# The keys that set each noise's process and level, required for that noise. A key of another
# noise only is refused: a value that changes nothing would still re-run the stage, and show in
# MLflow as if it had mattered.
NOISE_KEYS = {
    "masking": {"corruption", "masking"},
    "salt_pepper": {"corruption"},
    "gaussian": {"sigma"},
}
OPTIONAL_LAYER_KEYS = {"noise", "emphasis", "loss"}
PLAIN_EMPHASIS = (1.0, 1.0)
FINETUNE_KEYS = {"lr", "momentum", "lr_decay", "batch_size", "max_epochs", "patience", "patience_increase", "improvement_threshold"}


def _noise_kind(raw: dict, key: str) -> str:
    """The layer's ``noise`` (absent: masking, as in every params file written before the others), after
    refusing the keys that only another noise uses."""
    kind = _choice(raw.get("noise", "masking"), f"{key}.noise", NOISE_KINDS)
    # salt_pepper chooses its components as fixed masking does, so `masking: fixed` may stay: then
    # `-S pretrain.layer1.noise=salt_pepper` on the default params needs nothing else.
    if kind == "salt_pepper" and raw.get("masking", "fixed") != "fixed":
        raise ParamsError(f"{key}.masking: salt_pepper noise corrupts exactly round(nu*d) components per example, as "
                          f"masking: fixed does; remove masking or set it to fixed, got {raw['masking']!r}")
    for other in ("corruption", "masking", "sigma"):
        if other in raw and other not in NOISE_KEYS[kind] and not (kind == "salt_pepper" and other == "masking"):
            users = " and ".join(k for k, keys in NOISE_KEYS.items() if other in keys)
            raise ParamsError(f"{key}.{other}: used by {users} noise only, and this layer's noise is {kind}; "
                              f"remove it or change {key}.noise")
    return kind


def _emphasis(raw, key: str, kind: str) -> tuple[float, float]:
    if raw is None:
        return PLAIN_EMPHASIS
    raw = _section(raw, key, {"alpha", "beta"})
    alpha = _number(raw["alpha"], f"{key}.alpha", 0.0, INF, False, True)
    beta = _number(raw["beta"], f"{key}.beta", 0.0, INF, False, True)
    if alpha == beta == 0.0:
        raise ParamsError(f"{key}: alpha and beta cannot both be 0 (the loss would be 0, nothing learned)")
    if kind == "gaussian" and (alpha, beta) != PLAIN_EMPHASIS:
        raise ParamsError(f"{key}: gaussian noise corrupts every component, so there is nothing for beta to weigh "
                          f"apart; remove emphasis or use masking or salt_pepper noise, got alpha={alpha:g}, beta={beta:g}")
    return alpha, beta


def _layer(name: str, index: int, raw) -> LayerParams:
    key = f"pretrain.{name}"
    kind = _noise_kind(_mapping(raw, key, LAYER_KEYS | NOISE_KEYS["masking"]), key)
    optional = OPTIONAL_LAYER_KEYS | ({"masking"} if kind == "salt_pepper" else set())
    raw = _section(raw, key, LAYER_KEYS | NOISE_KEYS[kind], optional)
    expected_input = PREPARED_DIR if index == 1 else codes_dir(f"layer{index - 1}")
    if raw["input"] != expected_input:
        raise ParamsError(f"{key}.input: must be {expected_input!r} (the previous layer's clean codes), got {raw['input']!r}")
    uses_nu = "corruption" in NOISE_KEYS[kind]
    return LayerParams(
        name=name,
        input=raw["input"],
        units=_int(raw["units"], f"{key}.units", 1),
        corruption=_number(raw["corruption"], f"{key}.corruption", 0.0, 1.0, False, True) if uses_nu else None,
        masking=_choice(raw["masking"], f"{key}.masking", MASKING_MODES) if kind == "masking" else None,
        epochs=_int(raw["epochs"], f"{key}.epochs", 0),
        lr=_number(raw["lr"], f"{key}.lr", 0.0, INF, True, True),
        batch_size=_int(raw["batch_size"], f"{key}.batch_size", 1),
        noise=kind,
        sigma=_number(raw["sigma"], f"{key}.sigma", 0.0, INF, False, True) if kind == "gaussian" else None,
        emphasis=_emphasis(raw.get("emphasis"), f"{key}.emphasis", kind),
        loss=_choice(raw.get("loss", "cross_entropy"), f"{key}.loss", RECONSTRUCTION_LOSSES),
    )


FUSED_ENGINE_RUNS = "the fused engine runs masking noise with the plain loss only"


def _check_the_fused_engine_runs(layer: LayerParams) -> None:
    """Refuse, naming the key, what the fused engine's hand-written step does not implement (sda/pretrain.py)."""
    key = f"pretrain.{layer.name}"
    if layer.noise != "masking":
        raise ParamsError(f"{key}.noise: {layer.noise} needs engine: autograd ({FUSED_ENGINE_RUNS})")
    if layer.loss != "cross_entropy":
        raise ParamsError(f"{key}.loss: {layer.loss} needs engine: autograd ({FUSED_ENGINE_RUNS})")
    if layer.emphasis != PLAIN_EMPHASIS:
        alpha, beta = layer.emphasis
        raise ParamsError(f"{key}.emphasis: alpha={alpha:g}, beta={beta:g} needs engine: autograd ({FUSED_ENGINE_RUNS})")


def parse_params(raw) -> Params:
    # engine is optional for params files written before it existed: they mean "fused".
    raw = _section(raw, "params.yaml", {"seed", "data", "pretrain", "finetune"}, optional={"engine"})
    data = _section(raw["data"], "data", {"dataset"})
    pretrain = raw["pretrain"]
    if not isinstance(pretrain, dict) or not pretrain:
        raise ParamsError("pretrain: must map layer1, layer2, ... to layer sections, got " + repr(pretrain))
    layers = []
    for index, name in enumerate(pretrain, start=1):
        if not (isinstance(name, str) and re.fullmatch(r"layer[1-9][0-9]*", name)) or name != f"layer{index}":
            raise ParamsError(f"pretrain.{name}: layers must be named layer1, layer2, ... in order; expected layer{index} here")
        layers.append(_layer(name, index, pretrain[name]))
    ft = _section(raw["finetune"], "finetune", FINETUNE_KEYS)
    engine = _choice(raw.get("engine", "fused"), "engine", ENGINES)
    if engine == "fused":
        for layer in layers:
            _check_the_fused_engine_runs(layer)
    return Params(
        seed=_int(raw["seed"], "seed", 0),
        dataset=_choice(data["dataset"], "data.dataset", DATASETS),
        layers=tuple(layers),
        engine=engine,
        finetune=FinetuneParams(
            lr=_number(ft["lr"], "finetune.lr", 0.0, INF, True, True),
            momentum=_number(ft["momentum"], "finetune.momentum", 0.0, 1.0, False, True),
            lr_decay=_number(ft["lr_decay"], "finetune.lr_decay", 0.0, 1.0, True, False),
            batch_size=_int(ft["batch_size"], "finetune.batch_size", 1),
            max_epochs=_int(ft["max_epochs"], "finetune.max_epochs", 1),
            patience=_int(ft["patience"], "finetune.patience", 1),
            patience_increase=_number(ft["patience_increase"], "finetune.patience_increase", 1.0, INF, False, True),
            improvement_threshold=_number(ft["improvement_threshold"], "finetune.improvement_threshold", 0.0, 1.0, True, False),
        ),
    )


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: malformed YAML: {err}".replace("\n", " ")) from err
    return parse_params(raw)
