"""The run config: typed sections loaded from YAML, overridden by ``section.key=value``.

Each field documents itself with the string under it; `field_docs` reads those strings
back (from the source, with `ast`) so `trident train --help-config` and the error for an
unknown key show the same words. Validation happens once, in `load_config`, and names the
key and the valid values.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trident.errors import UserError
from trident.model.config import ModelConfig
from trident.model.gpt import RECOMPUTE
from trident.parallel.context.sharding import check_cp
from trident.parallel.pipeline.schedule import SCHEDULES as PIPELINE_SCHEDULES
from trident.parallel.pipeline.schedule import check_layout
from trident.parallel.topology import resolve_layout
from trident.parallel.zero.mixed_precision import DTYPES as PRECISION_DTYPES
from trident.parallel.zero.optimizer import OptimizerConfig
from trident.training.lr_schedule import LR_SCHEDULES

DTYPES = tuple(PRECISION_DTYPES)
NONFINITE = ("stop", "skip")


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps to run."""
    seed: int = 1234
    """Seeds weights (by global parameter name), dropout streams and the data order."""
    micro_batch_size: int = 4
    """Sequences per microbatch on one data-parallel rank."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all dp ranks: micro_batch_size x microbatches x dp."""
    dtype: str = "fp32"
    """Parameter and compute dtype: fp32 | bf16 | fp16 (fp32 master weights otherwise)."""
    device: str = "cpu"
    """cpu or cuda (NCCL is used for cuda, gloo for cpu)."""
    recompute: str = "none"
    """Activation recomputation, FLOPs traded for memory: none | selective (rebuild each
    attention core -- QK-norm, RoPE, softmax, dropout -- in backward; keep the qkv output) |
    full (keep only each block's input, rebuild the block). `trident plan` shows the saving."""
    compile: bool = False
    """Compile the transformer blocks with torch.compile."""
    time_budget_s: float = 0.0
    """Stop cleanly (with a checkpoint) after this many seconds of training; 0 = no limit."""
    exit_interval: int = 0
    """Stop cleanly (with a checkpoint) when the step count is divisible by this; 0 = never
    (Megatron's --exit-interval: split a run into jobs without changing its schedule)."""
    nonfinite: str = "stop"
    """On a non-finite loss or gradient in fp32/bf16: stop with an error, or skip the step."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy."""


@dataclass
class OptimSection(OptimizerConfig):
    """The optimizer's own settings (`OptimizerConfig`, documented there) plus the
    learning-rate schedule and the fp16 loss scale."""

    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to lr over this many steps."""
    schedule: str = "cosine"
    """After warm-up: cosine | linear | constant | wsd (warm-up, stable, decay)."""
    decay_fraction: float = 0.2
    """wsd only: the final fraction of the steps spent decaying to min_lr."""
    loss_scale: float = 65536.0
    """fp16 only: initial dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the scale grows by 2."""
    min_loss_scale: float = 1.0
    """fp16 only: the scale never backs off below this."""


@dataclass
class ParallelSection:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (stages)."""
    dp: int | None = None
    """Data-parallel size; derived as world / (tp * cp * pp) when unset."""
    cp: int = 1
    """Context-parallel size: each sequence is split over cp ranks (ring attention);
    data.seq_len must be a multiple of 2 * cp (load-balanced chunks)."""
    ep: int = 1
    """Expert-parallel size (MoE models): each MoE layer's experts are split over ep ranks
    carved out of dp (ep divides dp and model.moe_experts); tokens reach them by all-to-all."""
    sequence_parallel: bool = False
    """Shard norms, dropout and residuals along the sequence over the tp group."""
    pp_split: list[int] | None = None
    """Layers per pipeline stage, e.g. [3, 4, 4, 3]; balanced when unset."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b | interleaved | zb-h1 | gpipe (README: which to pick)."""
    vpp: int = 1
    """Virtual stages (model chunks) per pipeline rank; the interleaved schedule needs >= 2."""
    timeout_s: float = 600.0
    """Collective timeout: a rank waiting longer than this fails instead of hanging. The
    backstop for long legitimate waits (a checkpoint save's slowest writer); stalls are
    the watchdog's (stall_timeout_s)."""
    stall_timeout_s: float = 120.0
    """A rank that published no heartbeat, or stayed in one phase of a step, this long
    ends the job with one sentence naming it (rank, host, step, phase); 0 turns the
    watchdog off. Must be below timeout_s."""


@dataclass
class DataSection:
    seq_len: int = 256
    """Tokens per training sequence (samples hold seq_len + 1 tokens)."""
    prefix: list[str] | None = None
    """Indexed dataset prefixes (PREFIX.bin/.idx); the stdlib corpus is built when unset."""
    weights: list[float] | None = None
    """Blend weights, one per prefix; equal when unset."""
    split: str = "969,30,1"
    """train,valid,test proportions, carved by documents."""
    tokenizer: str | None = None
    """A sentencepiece .model (or HF tokenizer.json); trained on the corpus when unset."""
    vocab_size: int = 4096
    """Vocabulary of the tokenizer trained when none is given."""
    work_dir: str = ".cache/trident-data"
    """Where the default corpus, tokenizer and preprocessed data are kept and reused."""
    doc_masking: bool = True
    """Attend only within a document in packed sequences (and reset positions)."""
    mask_eod_loss: bool = False
    """Exclude end-of-document inputs from the loss."""
    prefetch: int = 2
    """Batches prepared ahead in the background."""


@dataclass
class CheckpointSection:
    interval: int = 0
    """Save every this many steps (and at the end); 0 = only at the end, -1 = never."""
    keep: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""


@dataclass
class EvalSection:
    interval: int = 0
    """Validate every this many steps (and at the end); 0 = only at the end."""
    iters: int = 4
    """Global batches per validation."""
    patience: int = 0
    """Stop after this many validations without improvement; 0 = never stop early."""


@dataclass
class LogSection:
    interval: int = 1
    """Write a metrics record every this many steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard extra)."""
    timeline: bool = False
    """Record a pipeline timeline (Chrome trace + PNG) of one step (log.timeline_step)."""
    timeline_step: int = 0
    """The step the timeline records; 0 = the first step after a warm-up of 2 (the last
    step when the run is shorter): start-up costs would hide the schedule's bubble."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0 = from the device table or a measured matmul."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string written under each field of a dataclass (and of the dataclasses it
    extends), by field name."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base is not cls and dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = nxt.value.value.strip()
    return docs


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation; ints are accepted where floats are."""
    hint = annotation
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]  # one dataset, one tokenizer file...: a string is a list of one
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _section_from_dict(name: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config section {name!r} must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"unknown config key {name}.{key}; valid keys in {name} are {', '.join(fields)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise UserError(f"a config file must hold a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UserError(f"unknown config section {name!r}; valid sections are {', '.join(SECTIONS)}")
        sections[name] = _section_from_dict(name, SECTIONS[name], values or {})
    return Config(**sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        path, sep, text = item.partition("=")
        section, dot, key = path.partition(".")
        if not sep or not dot or not key:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        if section not in SECTIONS:
            raise UserError(f"unknown config section {section!r} in {item!r}; valid sections are {', '.join(SECTIONS)}")
        raw.setdefault(section, {})[key] = yaml.safe_load(text) if text != "" else None
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate once."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> Config:
    """Every check that needs only the config (layout checks need the world size too)."""
    cfg.model.validate()
    for key, value, valid in (
        ("train.dtype", cfg.train.dtype, DTYPES),
        ("train.recompute", cfg.train.recompute, RECOMPUTE),
        ("train.nonfinite", cfg.train.nonfinite, NONFINITE),
        ("optim.schedule", cfg.optim.schedule, LR_SCHEDULES),
        ("parallel.pp_schedule", cfg.parallel.pp_schedule, PIPELINE_SCHEDULES),
    ):
        if value not in valid:
            raise UserError(f"{key} is {value!r}; valid values are {', '.join(valid)}")
    cfg.optim.validate()
    for key, value in (
        ("train.steps", cfg.train.steps),
        ("train.micro_batch_size", cfg.train.micro_batch_size),
        ("train.global_batch_size", cfg.train.global_batch_size),
        ("data.seq_len", cfg.data.seq_len),
    ):
        if value < 1:
            raise UserError(f"{key} must be >= 1, got {value}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.lr <= 0 or cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise UserError(
            f"need optim.lr > 0, 0 <= optim.min_lr <= optim.lr and optim.warmup_steps >= 0; "
            f"got lr={cfg.optim.lr}, min_lr={cfg.optim.min_lr}, warmup_steps={cfg.optim.warmup_steps}"
        )
    if not 0.0 < cfg.optim.decay_fraction <= 1.0:
        raise UserError(f"optim.decay_fraction={cfg.optim.decay_fraction} must be in (0, 1]")
    p = cfg.parallel
    if p.timeout_s <= 0 or p.stall_timeout_s < 0 or (p.stall_timeout_s > 0 and p.stall_timeout_s >= p.timeout_s):
        raise UserError(
            f"parallel.stall_timeout_s={p.stall_timeout_s:g} must be 0 (off) or below parallel.timeout_s="
            f"{p.timeout_s:g} (> 0), so a stalled rank is named before its peers' collectives time out"
        )
    if cfg.log.timeline_step < 0:
        raise UserError(f"log.timeline_step must be >= 0 (0 = after a warm-up of 2 steps), got {cfg.log.timeline_step}")
    if cfg.data.weights is not None and (cfg.data.prefix is None or len(cfg.data.weights) != len(cfg.data.prefix)):
        raise UserError("data.weights needs one weight per entry of data.prefix")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "log.tensorboard is true but the tensorboard package is not installed; "
            "pip install 'trident[tensorboard]' or set log.tensorboard=false"
        )
    return cfg


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the world size."""

    dp: int
    microbatches: int
    tokens_per_step: int


def derive(cfg: Config, world: int) -> Derived:
    """Check the layout against the world and the batch sizes against the layout."""
    p = cfg.parallel
    layout = resolve_layout(world, p.tp, p.pp, p.dp, p.cp, p.ep)
    cfg.model.check_tp(p.tp, p.ep)
    check_cp(cfg.data.seq_len, p.cp)
    if p.cp > 1 and cfg.model.attention_dropout > 0:
        raise UserError(
            f"model.attention_dropout={cfg.model.attention_dropout} cannot be used with parallel.cp={p.cp} "
            f"(ring attention has no dropout); set model.attention_dropout=0 or parallel.cp=1"
        )
    per_step = cfg.train.micro_batch_size * layout.dp
    if cfg.train.global_batch_size % per_step != 0:
        raise UserError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x dp = {cfg.train.micro_batch_size} x {layout.dp} = {per_step}"
        )
    if p.sequence_parallel and cfg.data.seq_len % (p.tp * p.cp) != 0:
        per = "" if p.cp == 1 else f" x cp={p.cp}"
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by tp={p.tp}{per} (sequence parallelism shards "
            f"each rank's {'' if p.cp == 1 else 'share of the '}sequence over tp)"
        )
    microbatches = cfg.train.global_batch_size // per_step
    check_layout(p.pp_schedule, p.pp, microbatches, p.vpp)
    if p.pp * p.vpp > cfg.model.n_layers:
        raise UserError(
            f"pp={p.pp} x parallel.vpp={p.vpp} = {p.pp * p.vpp} pipeline stages is more than "
            f"model.n_layers={cfg.model.n_layers}; every stage needs at least one layer"
        )
    return Derived(
        dp=layout.dp,
        microbatches=microbatches,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
    )
