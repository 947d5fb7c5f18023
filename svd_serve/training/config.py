"""Every setting of a run (:class:`TrainConfig`, declared with :mod:`svd_serve.schema`: its types,
defaults, bounds and the help texts of `svd-serve train`), a config file read into one, the
method's options, and the checks that refuse a bad run before any work."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..adapter import make_options, parse_option_values
from ..errors import SvdServeError
from ..methods import DEFAULT_METHOD, Adapter, Options, get_method
from ..hub import resolve
from ..model import check_base_dir
from ..schema import Settings, opt
from .distributed import check_device, check_fsdp
from .health import DEFAULT_LIMIT, parse_limit
from .quantized import QUANTIZE, check_quantize

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # compute dtypes of the base
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(kw_only=True)
class TrainConfig(Settings):
    """Every setting of a run, with its default (the CLI and config files read these defaults), in the
    order `svd-serve train --help` lists them."""

    base: str = opt(doc="Hugging Face model directory, or a Hugging Face Hub id (from the cache offline).  "
                        "[required]", path=True)
    revision: str | None = opt(None, "With a Hub id as --base: its branch, tag or commit hash (default: main).")
    data: str | None = opt(None, 'JSONL: {"text"}, {"prompt","completion"} or {"messages"}.  [required, or '
                                 "--forget-data]", path=True)
    out: str = opt(doc="Output directory: the adapter, metrics.jsonl, loss.png, checkpoints/.  [required]", path=True)
    # adapter
    method: str = opt(DEFAULT_METHOD, "Adapter method (see `svd-serve methods`).")  # any registered one (get_method)
    rank: int | None = opt(None, "Adapter rank r, the same as -o rank=R (default: the method's).")
    alpha: float | None = opt(None, "LoRA alpha, scale = alpha / r, the same as -o alpha=A; only methods with a "
                                    "scale take it (default: the method's).")
    targets: str = opt("q_proj,v_proj", "Module-name suffixes (comma list), 'all-linear', or a regex over full names.")
    options: dict = opt(factory=dict, doc="A method option, parsed by its type, e.g. -o ratio=0.2 (repeat). "
                        "`svd-serve methods` lists each method's options; an option the method does not have is "
                        "refused.", flag=("--option", "-o"), metavar="KEY=VALUE")
    reg: dict = opt(factory=dict, doc="A regularizer weight, e.g. --reg beta=1e-3: the same as -o, for regularizer "
                    "weights only.", metavar="KEY=VALUE")
    calib_data: str | None = opt(None, "JSONL for the calibration statistic of CorDA and KORE (input covariances) "
                                       "and LoKU (Fisher information; in an unlearning run the default is "
                                       "--forget-data).", path=True)
    # unlearning, instead of data: the forget rows' targets are pushed down (inverted hinge loss), the
    # retain rows' kept (cross-entropy); each step one global batch of each, the losses weighted
    forget_data: str | None = opt(None, "Unlearn instead of learning (instead of --data): JSONL whose target tokens "
                                        "the adapter pushes down with the inverted hinge loss (LoKU). Each step takes "
                                        "one batch of it and one of --retain-data.", path=True)
    retain_data: str | None = opt(None, "With --forget-data: JSONL kept with the usual cross-entropy (and the "
                                        "reference of LoKU's relative Fisher information).", path=True)
    forget_weight: float = opt(1.0, "Weight of the forget loss (mean inverted hinge per target token).", gt=0)
    retain_weight: float = opt(1.0, "Weight of the retain loss (mean cross-entropy per target token).", ge=0)
    # data
    max_length: int = opt(512, "Longer rows are truncated (and counted).", ge=2,
                          why="(a row's first token is never a target: one token leaves nothing to learn)")
    pack: bool = opt(False, "Concatenate short rows into rows of up to --max-length tokens.")
    eval_data: str | None = opt(None, "JSONL evaluated at checkpoints and at the end.", path=True)
    eval_split: float | None = opt(None, "Hold out this fraction of --data for evaluation, e.g. 0.05.", gt=0, lt=1)
    eval_every: int | None = opt(None, "Evaluate every N steps (default: at checkpoints and the end).", ge=1)
    # optimisation
    steps: int | None = opt(None, "Optimizer steps (default: one epoch).", ge=1)
    epochs: float | None = opt(None, "Epochs over the data (instead of --steps).", gt=0)
    batch_size: int = opt(4, "Rows per process and accumulation step.", ge=1)
    grad_accum: int = opt(1, "Accumulation steps per optimizer step.", ge=1)
    lr: float = opt(4e-4, "Peak learning rate of AdamW.", gt=0)
    schedule: str = opt("cosine", "Decay after warmup.", choices=SCHEDULES)
    warmup: float = opt(0.0, "Warmup steps (>= 1) or fraction of all steps (< 1).", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float | None = opt(1.0, "Clip the global gradient norm (0: off).", ge=0)
    dtype: str = opt("float32", "Compute dtype of the base: float32, or bfloat16 (half the memory; autocast). "
                                "Adapter parameters stay float32. float16 is not offered: it would need loss "
                                "scaling.", choices=tuple(COMPUTE_DTYPES))
    quantize: str | None = opt(None, "Hold the frozen base Linear weights quantized by bitsandbytes (QLoRA): nf4 or "
                                     "fp4 (4-bit) or int8; --dtype is the compute dtype. The init reads the "
                                     "full-precision weights and ΔW stays exact against them.", choices=QUANTIZE)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (less memory).")
    absorb_frozen: bool = opt(True, "Fold the frozen low-rank terms (KaSA, PiSSA, ...) into the run's base copy: "
                                    "faster steps (not with --quantize: they stay low-rank products).",
                              flag="--absorb-frozen/--no-absorb-frozen")
    max_init_loss_increase: float | str | None = opt(
        DEFAULT_LIMIT, "Refuse to train when the adapter at init raises the loss (on a few eval or training rows) "
        "by more than this many nats; 0, inf or off: never refuse (the check is still shown and recorded).",
        parse=parse_limit, want="a number of nats, 0, inf or off", metavar="NATS")
    seed: int = opt(0, "Seed of the adapter init, the data order and --eval-split.", ge=0, lt=2**32)
    # records and checkpoints
    save_every: int | None = opt(None, "Checkpoint to OUT/checkpoints/step-N every N steps.", ge=1)
    keep_checkpoints: int = opt(3, "Keep the last N checkpoints (and the best).", ge=1)
    resume: bool = opt(False, "Continue from the latest checkpoint in OUT/checkpoints.")
    overwrite: bool = opt(False, "Replace an earlier run at --out (its own files only).")
    device: str | None = opt(None, "cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu).")
    fsdp: bool = opt(False, "Under torchrun: shard the frozen base over the processes (FSDP2), each holding 1/N "
                            "of its weights, loaded sharded; the adapter stays replicated.")
    progress: bool = opt(True, "No progress bar.", flag="--no-progress")


PATH_FIELDS = tuple(name for name, f in TrainConfig.fields().items() if f.metadata["path"])


def load_config(path: str | Path | None, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML/JSON file, then ``overrides`` (flags given on the command line)."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise SvdServeError(f"config file not found: {path}")
        import yaml  # JSON is YAML

        try:
            values = yaml.safe_load(path.read_bytes()) or {}  # (bytes: a file that is not UTF-8 is a YAMLError)
        except yaml.YAMLError as e:
            raise SvdServeError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise SvdServeError(f"{path}: expected a mapping of option names to values")
        values = TrainConfig.from_mapping(values, str(path))  # YAML reads 1e-4 as a string: parsed by type
    values.update(overrides)
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None  # 0 turns clipping off
    if "max_init_loss_increase" in values:  # a number, or 0 / inf / off (YAML reads off as false)
        values["max_init_loss_increase"] = parse_limit(values["max_init_loss_increase"])
    missing = [k for k in ("base", "out") if not values.get(k)]
    if not values.get("data") and not values.get("forget_data"):
        missing.append("data (or --forget-data)")
    if missing:
        raise SvdServeError(f"missing {', '.join('--' + k for k in missing)} (as flags or in --config)")
    for key in ("options", "reg"):  # ["beta=1e-3"] strings or {"beta": 1e-3} mappings
        values[key] = parse_option_values(values.get("method", DEFAULT_METHOD), values.get(key) or {})
    cfg = TrainConfig(**values)
    method_options(cfg)  # refuse bad method options now
    return cfg


def method_options(cfg: TrainConfig) -> Options:
    """The method's options from ``options`` (``-o``), ``reg`` (``--reg``: regularizer weights only),
    ``rank`` and ``alpha``; a key given twice is refused."""
    weights = get_method(cfg.method).Options.regularizer_weights()
    for key in cfg.reg:
        if key not in weights:
            has = f"its coefficients: {', '.join(weights)}" if weights else "it has no regularizer"
            raise SvdServeError(f"--reg {key}: not a regularizer coefficient of {cfg.method} ({has})")
    values = dict(cfg.options)
    for flag, given in (("--reg", cfg.reg), ("--rank", {"rank": cfg.rank}), ("--alpha", {"alpha": cfg.alpha})):
        for key, value in given.items():
            if value is None:
                continue
            if key in values:
                raise SvdServeError(f"{key} is given twice (in -o/options and as {flag})")
            values[key] = value
    return make_options(cfg.method, **values)


def check_config(cfg: TrainConfig, given: type[Adapter] | None = None) -> Options | None:
    """Refuse a bad setting with one clear error; returns the method's options. ``given``: the class
    of a given adapter set (see :func:`svd_serve.training.train`), which has its own options (None is
    returned). A library caller's TrainConfig is parsed and checked as a config file's (the schema's
    types and bounds), then the settings are checked together."""
    for f in fields(cfg):  # types first, as a config file's, then the bounds
        setattr(cfg, f.name, TrainConfig.typed(f.name, getattr(cfg, f.name)))
    if given is not None and cfg.resume:
        raise SvdServeError("--resume continues a run from its own checkpoint, not from a given adapter set")
    method = given or get_method(cfg.method)
    check_base_dir(resolve(cfg.base, cfg.revision).path)
    check_device(cfg.device)
    if cfg.steps is not None and cfg.epochs is not None:
        raise SvdServeError("give --steps or --epochs, not both")
    if cfg.eval_data and cfg.eval_split:
        raise SvdServeError("give --eval-data or --eval-split, not both")
    if cfg.data and cfg.forget_data:
        raise SvdServeError("give --data (to learn) or --forget-data (to unlearn), not both")
    if cfg.retain_data and not cfg.forget_data:
        raise SvdServeError("--retain-data goes with --forget-data (unlearning)")
    if cfg.forget_data and cfg.eval_split:
        raise SvdServeError("--eval-split splits --data; to evaluate an unlearning run give --eval-data")
    opts = method_options(cfg) if given is None else None
    if (given is None and method.needs_calibration_for(opts) and not cfg.calib_data and not cfg.forget_data
            and not cfg.resume):
        raise SvdServeError(f"method {cfg.method} needs --calib-data" + (
            " with select=activation" if getattr(opts, "select", None) == "activation" else ""))
    cfg.check()  # choices and bounds
    check_fsdp(cfg)
    check_quantize(cfg, method, resolve(cfg.base, cfg.revision).path)
    return opts
