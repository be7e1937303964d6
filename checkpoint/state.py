"""What a checkpoint's meta.json holds, as one typed `RunState`, and the only code that reads it.

The trainer, the HF importer and the readers (resume, inspect, export, generate) all
used to build or pick apart meta.json as a free dict, each with its own idea of which
keys exist. `RunState` is that contract written once: every field meta.json holds, how
it is written (`to_dict`, key order and values exactly as before, so existing
checkpoints stay byte-for-byte readable and new ones byte-for-byte the same) and how it
is read back (`from_dict`, which names the file and the key when one is missing or of
the wrong type).

The run config is kept as a plain dict (``config``): this package sits below
`trident.training`, which owns the config's dataclasses. Readers here need only
``config.model`` (a `ModelConfig`) and ``config.data.tokenizer``; a trainer resuming
compares ``config.model`` with its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trident.errors import UserError
from trident.model.config import ModelConfig

FORMAT = "trident-checkpoint/1"


class CheckpointCorruptError(UserError):
    """A checkpoint file is missing, fails its checksum, or its meta.json is malformed."""


@dataclass(frozen=True)
class Layout:
    """The layout a checkpoint was saved at (what a resumed run reshards from)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    world: int = 1
    zero: int = 0
    ep: int = 1  # expert parallelism (written only when > 1)


@dataclass(frozen=True)
class EarlyStopping:
    """The early-stopping counters: the best validation loss so far and evaluations since."""

    best_val: float | None = None
    evals_without_improvement: int = 0


@dataclass
class RunState:
    """Everything meta.json holds. The defaults are a run that has not started yet;
    `save_checkpoint` fills `step`, `layout`, `files` and `expert_bias` when it writes the checkpoint."""

    consumed_samples: int = 0
    scheduler: dict[str, Any] = field(default_factory=lambda: {"steps_taken": 0})  # the LR schedule's state_dict
    loss_scaler: dict[str, Any] = field(default_factory=dict)  # the loss scaler's state_dict ({}: a fresh one)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    seed: int = 0
    tokenizer: str | None = None  # the path the run's tokenizer was read from
    config: dict[str, Any] = field(default_factory=dict)  # the run config; at least "model", usually "data"
    imported_from: str | None = None  # the Hugging Face folder an imported checkpoint came from
    step: int = 0
    layout: Layout = field(default_factory=Layout)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    # MoE selection bias by global name (trident.model.moe.expert_bias_state); {} when the model has none
    expert_bias: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """meta.json's object, keys in the order every trident checkpoint has written them."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "step": self.step,
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                       "world": self.layout.world, "zero": self.layout.zero,
                       **({"ep": self.layout.ep} if self.layout.ep > 1 else {})},
            "files": dict(self.files),
            "consumed_samples": self.consumed_samples,
            "scheduler": self.scheduler,
            "loss_scaler": self.loss_scaler,
            "early_stopping": {"best_val": self.early_stopping.best_val,
                               "evals_without_improvement": self.early_stopping.evals_without_improvement},
            "seed": self.seed,
            "tokenizer": self.tokenizer,
            "config": self.config,
        }
        if self.imported_from is not None:
            out["imported_from"] = self.imported_from
        if self.expert_bias:  # only an MoE with a selection bias: every other checkpoint stays byte-for-byte the same
            out["expert_bias"] = self.expert_bias
        return out

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], where: str = "meta.json") -> "RunState":
        """The state a meta.json object records; `where` (the file) is named in every error.
        Keys this version does not know are ignored, so a newer writer's additions never
        make a checkpoint unreadable."""
        get = _Reader(meta, where)
        if get("format", str) != FORMAT:
            raise CheckpointCorruptError(f"{where} has format {meta['format']!r}, expected {FORMAT!r}")
        lay, es, files = get("layout", dict), get("early_stopping", dict), get("files", dict)
        return cls(
            consumed_samples=get("consumed_samples", int),
            scheduler=get("scheduler", dict),
            loss_scaler=get("loss_scaler", dict),
            early_stopping=EarlyStopping(
                best_val=get.inside(es, "early_stopping", "best_val", (int, float, type(None))),
                evals_without_improvement=get.inside(es, "early_stopping", "evals_without_improvement", int),
            ),
            seed=get("seed", int),
            tokenizer=get("tokenizer", (str, type(None))),
            config=get("config", dict),
            imported_from=get("imported_from", (str, type(None)), optional=True),
            step=get("step", int),
            layout=Layout(**{k: get.inside(lay, "layout", k, int) for k in ("tp", "pp", "dp", "world", "zero")},
                          ep=get.inside(lay, "layout", "ep", int) if "ep" in lay else 1),
            files={name: get.inside(files, "files", name, str) for name in files},
            expert_bias=_expert_bias(get("expert_bias", dict, optional=True) or {}, where),
        )

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` the checkpoint was saved with (``config.model``)."""
        saved = self.config.get("model")
        if not isinstance(saved, dict):
            raise CheckpointCorruptError("meta.json records no model config (config.model)")
        unknown = sorted(set(saved) - set(ModelConfig.__dataclass_fields__))
        if unknown:
            raise UserError(f"the checkpoint's model config has fields this trident does not know: {', '.join(unknown)}")
        return ModelConfig(**saved).validate()

    def recorded_tokenizers(self) -> list[str]:
        """The tokenizer paths the run recorded: ``tokenizer``, then ``config.data.tokenizer``."""
        data = self.config.get("data")
        recorded = [self.tokenizer, data.get("tokenizer") if isinstance(data, dict) else None]
        return [r for r in recorded if isinstance(r, str) and r]


def _expert_bias(saved: dict[str, Any], where: str) -> dict[str, list[float]]:
    """meta.json's ``expert_bias``, every value checked to be a list of numbers."""
    for name, values in saved.items():
        numbers = isinstance(values, list) and all(type(v) in (int, float) for v in values)  # bool is no number
        if not numbers:
            raise CheckpointCorruptError(f"{where} has expert_bias.{name} = {values!r}, expected a list of numbers")
    return saved


# the fields a trainer or importer chooses; step, layout and files come from the save itself
RUN_FIELDS = ("consumed_samples", "scheduler", "loss_scaler", "early_stopping", "seed", "tokenizer", "config",
              "imported_from")


class _Reader:
    """Typed look-ups in a meta.json object, each failure one sentence naming file and key."""

    def __init__(self, meta: Mapping[str, Any], where: str) -> None:
        self.meta, self.where = meta, where

    def __call__(self, key: str, kinds: type | tuple[type, ...], optional: bool = False) -> Any:
        if key not in self.meta:
            if optional:
                return None
            raise CheckpointCorruptError(f"{self.where} has no {key!r}; the checkpoint is incomplete or not trident's")
        return self._check(self.meta[key], key, kinds)

    def inside(self, obj: Mapping[str, Any], parent: str, key: str, kinds: type | tuple[type, ...]) -> Any:
        if key not in obj:
            raise CheckpointCorruptError(f"{self.where} has no {parent}.{key}; the checkpoint is incomplete")
        return self._check(obj[key], f"{parent}.{key}", kinds)

    def _check(self, value: Any, key: str, kinds: type | tuple[type, ...]) -> Any:
        allowed = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
            raise CheckpointCorruptError(f"{self.where} has {key} = {value!r}, expected {names}")
        return value


# --- reading meta.json -----------------------------------------------------------------------
def read_meta(ckpt: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder as its raw JSON object (format checked).
    Prefer `read_state`, which also checks every field."""
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        raise CheckpointCorruptError(f"{str(path)!r} does not exist; {str(ckpt)!r} is not a complete checkpoint")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointCorruptError(f"{str(path)!r} is not valid JSON ({err.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointCorruptError(f"{str(path)!r} has format {found!r}, expected {FORMAT!r}")
    return meta


def read_state(ckpt: str | Path) -> RunState:
    """The `RunState` a checkpoint folder's meta.json records, every field checked."""
    return RunState.from_dict(read_meta(ckpt), where=repr(str(Path(ckpt) / "meta.json")))


def as_state(meta: RunState | Mapping[str, Any]) -> RunState:
    """`meta` as a `RunState` (a raw meta.json object is read and checked)."""
    return meta if isinstance(meta, RunState) else RunState.from_dict(meta)
