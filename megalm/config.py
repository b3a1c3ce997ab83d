"""The run configuration: a typed schema, YAML loading with model presets, dotted overrides.

Every knob is a dataclass field with a default and a one-line help (``field(help=...)``).

Run files and model presets ship inside the package (``megalm/configs/``, also reachable as the
checkout's top-level ``configs/``), so an installed wheel finds them from any directory. A run is
given by path (``configs/quickstart.yaml``, ``~/runs/mine.yaml``) or by the name of a shipped run
(``quickstart``). A run file names its model as a preset (``model: tiny``), as a YAML file of its
own (``model: my-model.yaml``, relative to the run file), or inline; a mapping with ``from:`` loads
that preset or file and then applies its own keys. Command-line overrides are ``section.key=value``
strings parsed as YAML scalars. Everything is checked before any process group starts: unknown
keys (with the closest valid name), wrong types, bad values and impossible combinations raise
:class:`ConfigError` naming the key path; so do what YAML itself lets pass: a key given twice in one
mapping (PyYAML keeps the last), an empty file, and a number that is inf or nan.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from megalm.errors import ConfigError

log = logging.getLogger("megalm")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped runs; presets in model/


def field(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and one line of help."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _fresh(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _fresh(value: Any) -> Any:
    return dataclasses.replace(value) if dataclasses.is_dataclass(value) else type(value)(value)


@dataclass(frozen=True)
class KernelsConfig:
    attention: Literal["auto", "triton", "sdpa", "torch"] = field(
        "auto", "attention implementation; auto picks the fastest available on the device")
    norm: Literal["auto", "triton", "cuda", "apex", "torch"] = field(
        "auto", "LayerNorm/RMSNorm implementation; auto picks the fastest available on the device")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field("custom", "a label for this architecture (set by presets)")
    style: Literal["gpt2", "llama"] = field(
        "gpt2", "gpt2: LayerNorm, learned positions, GELU, biases; llama: RMSNorm, RoPE, SwiGLU, no biases")
    objective: Literal["causal", "masked"] = field(
        "causal", "causal: next-token LM, left-to-right attention; masked: BERT-style masked LM, bidirectional attention")
    mask_prob: float = field(0.15, "masked: share of the tokens chosen for prediction (special tokens never are)")
    mask_token_share: float = field(0.8, "masked: of the chosen tokens, the share replaced by the mask token")
    mask_random_share: float = field(0.1, "masked: of the chosen tokens, the share replaced by a random token "
                                          "(the rest stay unchanged)")
    n_layers: int = field(4, "number of Transformer blocks")
    d_model: int = field(256, "hidden size")
    n_heads: int = field(4, "attention (query) heads")
    n_kv_heads: int = field(0, "key/value heads for grouped-query attention; 0 means n_heads")
    d_ff: int = field(0, "MLP hidden size; 0 means 4*d_model (gpt2) or 8/3*d_model rounded up to 64 (llama)")
    vocab_size: int = field(0, "vocabulary size; 0 means the tokenizer's")
    max_seq_len: int = field(0, "longest sequence the position embedding covers; 0 means data.seq_len")
    tie_embeddings: bool = field(True, "share the input embedding and output head weights")
    dropout: float = field(0.0, "dropout on attention output, MLP output and embeddings")
    norm_eps: float = field(1e-5, "epsilon of LayerNorm/RMSNorm")
    rope_theta: float = field(10000.0, "RoPE base (llama style)")
    init_std: float = field(0.02, "std of the normal init; output projections are scaled by 1/sqrt(2*n_layers)")
    kernels: KernelsConfig = field(KernelsConfig(), "which kernel implements each op")
    labels: list[str] = field([], "a classifier's classes, in its head's order (empty: a language model; "
                                  "train.task=classify takes the training file's, sorted, unless given)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.style == "gpt2":
            return 4 * self.d_model
        return -(-int(8 * self.d_model / 3) // 64) * 64


@dataclass(frozen=True)
class MixSource:
    dir: str = field("", "a prepared data directory (local path, http(s):// URL, or pipe:COMMAND with {} for each file)")
    weight: float = field(1.0, "share of every global batch taken from this source (weights are normalized)")
    shards: str = field("", "where this source's shards are read from when not beside index.json (see data.shards)")


@dataclass(frozen=True)
class DataConfig:
    source: str = field("python-stdlib", "text to prepare: python-stdlib, a directory, a glob or file of text, "
                                         ".jsonl(.gz/.zst), parquet, or a Hugging Face dataset saved to disk")
    dir: str = field("data/python-stdlib", "the prepared directory: shards, index.json, tokenizer.json (local path, "
                                           "http(s):// URL, or pipe:COMMAND where {} stands for each file name)")
    shards: str = field("", "where the shards are read from when not beside index.json: a URL prefix, or a brace "
                            "pattern naming them in index order (e.g. https://host/d/train-{000000..000099}.tar)")
    mix: list[MixSource] = field([], "several prepared directories mixed by weight; replaces data.dir when given")
    tokenizer: str = field("", "an existing tokenizer.json to use instead of training one")
    vocab_size: int = field(8192, "vocabulary size of a newly trained byte-level BPE tokenizer")
    text_field: str = field("text", "prepare: the field holding the text in .jsonl, parquet and HF datasets")
    normalize: Literal["NFC", "NFKC", "none"] = field("NFC", "prepare: Unicode normalization of every document")
    min_chars: int = field(1, "prepare: documents shorter than this (after cleaning) are dropped and counted")
    dedup: bool = field(True, "prepare: drop exact duplicate documents (by content hash) and count them")
    prepare_workers: int = field(0, "prepare: tokenizer worker processes (0: one per CPU core)")
    val_fraction: float = field(0.02, "fraction of documents held out for validation")
    shard_tokens: int = field(1_000_000, "target tokens per training shard")
    seq_len: int = field(256, "tokens per training sequence")
    shuffle_tokens: int = field(65536, "per-lane shuffle buffer of documents, in tokens (bounds loader memory)")
    on_bad_shard: Literal["error", "skip"] = field(
        "error", "a missing, corrupt or mismatched shard stops training (error) or is skipped, logged and counted")
    cache_dir: str = field("", "where remote (http, pipe:) shards are spooled while read; empty: the system temp dir")
    num_workers: int = field(0, "data loader worker processes per rank")
    eval_sequences: int = field(64, "validation sequences scored at each evaluation")
    seed: int = field(1234, "seed of the document split and shuffling")
    skip_steps: list[int] = field([], "steps whose data is read and not trained on (their update is skipped); "
                                      "a rollback adds the steps it skips to the run's own list")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = field(1, "tensor-parallel size: ranks splitting each layer's heads and MLP (keep inside a node)")
    pp: int = field(1, "pipeline-parallel size: ranks holding consecutive layers, run by parallel.pp_schedule")
    cp: int = field(1, "context-parallel size: ranks splitting each sequence, a part each; attention by all-to-all "
                       "over heads (DeepSpeed-Ulysses): the heads per tensor rank must be divisible by cp")
    dp: int = field(0, "data-parallel size (replicas reading different sequences); 0 means world_size / (tp * pp * cp)")
    sequence_parallel: bool = field(False, "shard activations outside the tensor-parallel matmuls along the sequence")
    activation_checkpointing: Literal["none", "full", "selective"] = field(
        "none", "recompute in backward: whole blocks (full) or the attention core only (selective)")
    pp_partition: Literal["parameters", "uniform"] = field(
        "parameters", "how layers are assigned to pipeline chunks: balance parameters, or equal layer counts")
    pp_schedule: Literal["1f1b", "interleaved", "zb", "zbv"] = field(
        "1f1b", "pipeline schedule (torch.distributed.pipelining): 1f1b; interleaved 1F1B over "
                "parallel.virtual_stages chunks per rank; zb, zero bubble on those chunks (backward split into "
                "input and weight gradients); zbv, zero bubble on 2 chunks per rank placed in a V")
    virtual_stages: int = field(0, "pipeline chunks per rank (0: the schedule's own: 2 for interleaved and zbv, "
                                   "else 1)")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = field(
        "offline", "wandb mode; online needs a configured API key")
    project: str = field("megalm", "wandb project name")


@dataclass(frozen=True)
class ProfileConfig:
    steps: list[int] = field([], "[first, last] steps to record with torch.profiler (empty: none)")
    ranks: list[int] = field([0], "the ranks that record")
    memory: bool = field(False, "also record memory allocations (and tensor shapes)")


@dataclass(frozen=True)
class SpikeConfig:
    factor: float = field(3.0, "a step whose loss exceeds FACTOR x the median of the last WINDOW steps' losses is a "
                               "spike: the run rolls back to its newest checkpoint before it and skips its data "
                               "(0: never)")
    window: int = field(50, "steps in the running median")
    warmup: int = field(50, "steps trained before spikes are judged (the loss falls fast at first)")


@dataclass(frozen=True)
class Fp8Config:
    layers: Literal["off", "auto", "all"] = field(
        "off", "FP8 matmuls in the Transformer blocks' linear layers (a bf16 run; megalm/model/fp8.py): auto converts "
               "each layer shape that this device's own timing finds faster in FP8, casts included; all converts "
               "every one")
    recipe: Literal["tensorwise", "rowwise"] = field("tensorwise", "torchao's dynamic scaling: per tensor or per row")
    min_speedup: float = field(1.05, "auto converts a shape whose forward+backward is at least this much faster")
    timings: str = field("", "auto: a timing table to decide from (megalm bench kernels --ops fp8 writes one) "
                             "instead of timing this run's shapes at start-up")
    emulate: bool = field(False, "run the FP8 casts and scales with high-precision matmuls (torchao's emulation: "
                                 "tests on a CPU)")


@dataclass(frozen=True)
class StragglerConfig:
    ratio: float = field(1.5, "a rank whose own time per step (compute and data, not waiting in collectives) is "
                              "RATIO x the median of the other ranks of its pipeline stage or more is slow (0: never "
                              "warn)")
    steps: int = field(5, "a rank slow this many steps in a row is named in a warning, with its host and device")


@dataclass(frozen=True)
class TrainConfig:
    task: Literal["lm", "classify"] = field(
        "lm", "lm: language modelling on data.dir (model.objective causal or masked); classify: a classifier "
              "(model.labels) trained on classify.train_file, from train.init_from's weights")
    run_dir: str = field("runs/quickstart", "everything the run writes goes here")
    steps: int = field(200, "optimizer steps to train")
    global_batch: int = field(64, "sequences per optimizer step over all ranks; it alone decides the data order "
                                  "and the learning curve, whatever the GPU count")
    micro_batch_size: int = field(8, "sequences per rank per forward pass; gradient accumulation makes up the rest "
                                     "of the global batch")
    lr: float = field(1e-3, "peak learning rate")
    min_lr: float = field(1e-4, "learning rate at the end of decay")
    warmup_steps: int = field(20, "linear warmup steps")
    schedule: Literal["cosine", "wsd", "constant"] = field(
        "cosine", "decay after warmup: cosine, warmup-stable-decay, or constant")
    decay_fraction: float = field(0.2, "wsd: fraction of steps spent in the final linear decay")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.95, "AdamW beta2")
    grad_clip: float = field(1.0, "clip the global gradient norm to this (0 disables)")
    precision: Literal["fp32", "bf16"] = field("fp32", "training precision")
    compile: bool = field(False, "torch.compile each Transformer block (the first steps pay for compiling)")
    zero_stage: int = field(0, "DeepSpeed ZeRO stage 0-3")
    seed: int = field(0, "seed of model init and dropout")
    device: Literal["auto", "cpu", "cuda"] = field("auto", "auto uses CUDA when available")
    log_every: int = field(10, "log metrics every N steps")
    eval_every: int = field(100, "evaluate on the validation split every N steps (and at the end)")
    stop_at: int = field(0, "stop (after saving) once this step is reached; the schedule still spans train.steps (0: never)")
    save: bool = field(True, "write checkpoints at all (false: throwaway runs such as benchmarks)")
    save_every: int = field(0, "save a checkpoint every N steps (0: only at the end and when stopped)")
    keep_checkpoints: int = field(2, "keep the newest K checkpoints")
    keep_every: int = field(0, "also keep every checkpoint whose step is a multiple of M, forever (0: none)")
    async_save: bool = field(True, "write checkpoints in the background while training continues (false: wait for each)")
    resume: str = field("auto", "auto: from run_dir's newest valid checkpoint; never; or a checkpoint PATH to start "
                                "from when run_dir has none of its own")
    init_from: str = field("", "a run dir or checkpoint to take the weights from (any layout) when run_dir has no "
                               "checkpoint of its own, with a fresh optimizer, LR schedule and data position "
                               "(continued pretraining: megalm finetune --task lm)")
    init_keep_optimizer: bool = field(False, "with init_from: also keep its Adam moments and its step count, so the "
                                             "LR schedule goes on from its step (train.steps must exceed it); the "
                                             "data position and random streams still start fresh")
    progress: bool = field(True, "show a progress bar on rank 0")
    plot: bool = field(True, "draw the run's pictures when it ends: RUN_DIR/loss.png (and a classifier's "
                             "confusion.png; its numbers are in eval.json either way)")
    wandb: WandbConfig = field(WandbConfig(), "Weights & Biases logging")
    profile: ProfileConfig = field(ProfileConfig(), "torch profiler traces of chosen steps (RUN_DIR/profile/)")
    spike: SpikeConfig = field(SpikeConfig(), "loss spikes rolled back (megalm/train/rollback.py)")
    fp8: Fp8Config = field(Fp8Config(), "FP8 linear layers (megalm/model/fp8.py)")
    max_nonfinite: int = field(3, "this many non-finite (skipped) steps in a row roll the run back, as a spike does")
    max_rollbacks: int = field(3, "rollbacks a run may make; one more anomaly then stops it with an error")
    rollback_copy: bool = field(True, "every rank also holds the newest save in host memory (the size of what it "
                                      "holds on its device, in fp32), so a rollback to it reads no file (false: "
                                      "rollbacks read the checkpoint's files)")
    straggler: StragglerConfig = field(StragglerConfig(), "slow ranks named (megalm/observe/stragglers.py)")
    collectives_kept: int = field(64, "each rank keeps its last N collectives, written to RUN_DIR/collectives/ with "
                                      "every watchdog verdict and failure")
    watchdog_timeout_s: float = field(
        600.0, "a rank that makes no progress (or stops its heartbeat) this long ends the run, named (0: off)")
    collective_timeout_s: float = field(1800.0, "how long a collective may wait for a peer before it fails")
    peak_tflops: float = field(0.0, "the GPU's dense peak TFLOP/s at train.precision, for MFU (0: from megalm's table "
                                    "for a known GPU; none on other devices and CPUs)")


@dataclass(frozen=True)
class SlurmConfig:
    max_requeues: int = field(3, "requeues in a row that end at the same step before the job gives up")
    max_restarts: int = field(3, "a run whose rank died without a word (killed, out of memory), whose node failed, or "
                                 "that the watchdog ended is restarted this many times, from its newest checkpoint, "
                                 "without a requeue: by the node launcher on one node, as a new job step (a spare "
                                 "node replacing a failed one) on several")
    signal_lead_s: int = field(180, "seconds before the time limit that Slurm signals the job to save and requeue")
    rdzv_wait_s: int = field(120, "how long a node waits for the rendezvous on the first node before failing")


@dataclass(frozen=True)
class ClassifyConfig:
    train_file: str = field("", "a .jsonl file of {text, label} records to train on (train.task=classify)")
    eval_file: str = field("", "a .jsonl file of {text, label} records scored every train.eval_every steps")
    max_len: int = field(0, "tokens per text, longer ones truncated (0: model.max_seq_len)")
    epochs: float = field(0.0, "passes over the training file; when > 0 it decides train.steps")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(ModelConfig(), "the Transformer")
    data: DataConfig = field(DataConfig(), "preparing and streaming the corpus")
    parallel: ParallelConfig = field(ParallelConfig(), "the parallel layout")
    train: TrainConfig = field(TrainConfig(), "optimization, logging and checkpointing")
    slurm: SlurmConfig = field(SlurmConfig(), "Slurm jobs: requeue and signals (megalm slurm submit)")
    classify: ClassifyConfig = field(ClassifyConfig(), "the labelled texts of train.task=classify")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, section: str, **changes: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


# ---------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = (), check: bool = True) -> Config:
    """Read a run file (a path, a shipped run's name, or None for the defaults), apply overrides,
    validate (with ``check``: the planner checks each layout it weighs on its own)."""
    raw: dict = {}
    base_dir = CONFIG_DIR
    if path is not None:
        path = run_file(path)
        raw = _read_yaml(path)
        base_dir = path.resolve().parent
    raw = _expand_model_preset(raw, base_dir)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.steps=50")
        if key == "model" and not value.startswith("{"):
            raw = _expand_model_preset({**raw, "model": value}, Path.cwd())
            continue
        _set_dotted(raw, key.split("."), _parse_yaml(value, f"override {item!r}") if value != "" else "")
    cfg = from_dict(Config, raw, "")
    if check:
        validate(cfg)
    return cfg


def shipped(kind: str = "") -> list[str]:
    """Names of the runs (kind "") or model presets (kind "model") that ship with megalm."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def run_file(name: str | Path) -> Path:
    """A run given by path, or by the name of a shipped run (``quickstart``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.parent == Path(".") and (CONFIG_DIR / f"{path.stem}.yaml").is_file():
        return CONFIG_DIR / f"{path.stem}.yaml"
    raise ConfigError(f"{name}: no such config file, nor a shipped run of that name "
                      f"(shipped runs: {', '.join(shipped())})")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); a config is a YAML file "
                          f"such as configs/quickstart.yaml") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: empty (no settings, only blank lines or comments); give the sections to set "
                          f"(model, data, parallel, train), or name a shipped run ({', '.join(shipped())})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, parallel, train)")
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last one silently, so a second ``train:`` section would quietly replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict = {}
        for key_node, _ in node.value:  # before the safe loader flattens merge keys (<<), which may repeat keys
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise _DuplicateKey(key, lines[key], line)
                lines[key] = line
            except TypeError:  # an unhashable key: the safe loader says so itself
                pass
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (a config file, or an override's value); ``where`` names it in errors."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: safe
    except _DuplicateKey as e:
        lines = f" (lines {e.first} and {e.second})" if e.first != e.second else ""
        raise ConfigError(f"{where}: key {e.key!r} is given twice{lines}; YAML would keep only the last, so remove "
                          f"or merge one of them") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def _expand_model_preset(raw: dict, base_dir: Path) -> dict:
    """``model: NAME`` or ``model: {from: NAME, ...}`` -> the preset's keys, then the run's own.

    NAME is a YAML file (absolute, or relative to ``base_dir``, the run file's directory), a preset
    beside the run file (``base_dir/model/NAME.yaml``), or a shipped preset."""
    model = raw.get("model")
    if isinstance(model, str):
        model = {"from": model}
    if not isinstance(model, dict) or "from" not in model:
        return raw
    name = str(model["from"])
    candidates = [base_dir / Path(name).expanduser(), base_dir / "model" / f"{name}.yaml",
                  CONFIG_DIR / "model" / f"{name}.yaml"]
    preset_path = next((p for p in candidates if p.is_file()), None)
    if preset_path is None:
        raise ConfigError(f"model: no preset or model file named {name!r} (looked in {base_dir}); "
                          f"shipped presets: {', '.join(shipped('model'))}")
    preset = _read_yaml(preset_path)
    rest = {k: v for k, v in model.items() if k != "from"}
    return {**raw, "model": {**preset, **rest}}


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(keys)}: {k} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"{path}: unknown key{hint} (valid: {', '.join(fields)})")
        values[key] = _coerce(hints[key], value, path)
    return cls(**values)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: unsupported field type {tp}")  # the schema uses none
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # inf or nan would reach the optimizer or a timer as a number
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported field type {tp}")


# ------------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check values and combinations; with world_size, also the layout against the processes."""
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    positive = {
        "model.n_layers": m.n_layers, "model.d_model": m.d_model, "model.n_heads": m.n_heads,
        "data.seq_len": d.seq_len, "data.shard_tokens": d.shard_tokens, "data.shuffle_tokens": d.shuffle_tokens,
        "data.vocab_size": d.vocab_size, "train.steps": t.steps, "train.micro_batch_size": t.micro_batch_size,
        "train.global_batch": t.global_batch, "train.log_every": t.log_every, "train.eval_every": t.eval_every,
        "train.keep_checkpoints": t.keep_checkpoints, "data.eval_sequences": d.eval_sequences,
        "train.collective_timeout_s": t.collective_timeout_s, "slurm.signal_lead_s": cfg.slurm.signal_lead_s,
        "slurm.rdzv_wait_s": cfg.slurm.rdzv_wait_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    non_negative = {"model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff, "model.vocab_size": m.vocab_size,
                    "model.max_seq_len": m.max_seq_len, "train.warmup_steps": t.warmup_steps,
                    "train.save_every": t.save_every, "train.keep_every": t.keep_every, "train.stop_at": t.stop_at,
                    "train.watchdog_timeout_s": t.watchdog_timeout_s, "slurm.max_requeues": cfg.slurm.max_requeues,
                    "slurm.max_restarts": cfg.slurm.max_restarts,
                    "data.num_workers": d.num_workers, "data.min_chars": d.min_chars,
                    "data.prepare_workers": d.prepare_workers, "parallel.dp": p.dp,
                    "train.spike.factor": t.spike.factor, "train.spike.warmup": t.spike.warmup,
                    "train.max_rollbacks": t.max_rollbacks, "train.straggler.ratio": t.straggler.ratio}
    for key, value in {"parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.cp": p.cp}.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_kv_heads: model.n_heads={m.n_heads} is not divisible by n_kv_heads={m.kv_heads}")
    if m.style == "llama" and m.head_dim % 2:
        raise ConfigError(f"model: RoPE needs an even head dim, got d_model/n_heads={m.head_dim}")
    if m.max_seq_len and m.max_seq_len < d.seq_len:
        raise ConfigError(f"model.max_seq_len: {m.max_seq_len} is shorter than data.seq_len={d.seq_len}")
    if not 0.0 < m.mask_prob < 1.0:
        raise ConfigError(f"model.mask_prob: must be in (0, 1), got {m.mask_prob}")
    if m.mask_token_share < 0 or m.mask_random_share < 0 or m.mask_token_share + m.mask_random_share > 1:
        raise ConfigError(f"model.mask_token_share, model.mask_random_share: need two non-negative shares summing to "
                          f"at most 1, got {m.mask_token_share} and {m.mask_random_share}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if not 0.0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction: must be in (0, 0.5), got {d.val_fraction}")
    if any(step < 1 for step in cfg.data.skip_steps):
        raise ConfigError(f"data.skip_steps: steps count from 1, got {cfg.data.skip_steps}")
    for key, value in {"train.spike.window": t.spike.window, "train.max_nonfinite": t.max_nonfinite,
                       "train.straggler.steps": t.straggler.steps, "train.collectives_kept": t.collectives_kept}.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if t.profile.steps and (len(t.profile.steps) != 2 or not 1 <= t.profile.steps[0] <= t.profile.steps[1]):
        raise ConfigError(f"train.profile.steps: expected [first, last] with 1 <= first <= last, got {t.profile.steps}")
    for i, source in enumerate(d.mix):
        if not source.dir:
            raise ConfigError(f"data.mix[{i}].dir: a prepared data directory is required")
        if source.weight <= 0:
            raise ConfigError(f"data.mix[{i}].weight: must be positive, got {source.weight}")
    if d.vocab_size < 257:
        raise ConfigError(f"data.vocab_size: a byte-level BPE needs at least 257 entries, got {d.vocab_size}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: need 0 <= min_lr <= lr and lr > 0, got lr={t.lr} min_lr={t.min_lr}")
    if t.warmup_steps >= t.steps and t.schedule != "constant":
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} leaves no decay in train.steps={t.steps}")
    if t.resume not in ("auto", "never") and not Path(t.resume).expanduser().exists():
        raise ConfigError(f"train.resume: {t.resume!r} is not auto, never, or an existing checkpoint path")
    if t.init_from and not Path(t.init_from).expanduser().exists():
        raise ConfigError(f"train.init_from: {t.init_from!r} does not exist")
    if t.init_from and t.resume not in ("auto", "never"):
        raise ConfigError(f"train.init_from: both it and train.resume={t.resume!r} say where a new run starts; "
                          f"give init_from (weights, fresh optimizer) or resume (the whole run), not both")
    if t.init_keep_optimizer and not t.init_from:
        raise ConfigError("train.init_keep_optimizer: keeps the optimizer of train.init_from, which is not given")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction: must be in (0, 1], got {t.decay_fraction}")
    validate_task(cfg)
    validate_model_split(cfg)
    validate_fp8(cfg)
    if world_size is not None:
        validate_layout(cfg, world_size)


def validate_fp8(cfg: Config) -> None:
    """What FP8 linear layers compose with (megalm/model/fp8.py): a bf16 run; tensor parallelism without
    sequence parallelism, pipelines, data parallelism and every ZeRO stage; not the fused linears that
    move their input between ranks inside one autograd function (SP's gather, cp's all-to-all)."""
    f, p = cfg.train.fp8, cfg.parallel
    if f.layers == "off":
        return
    if cfg.train.precision != "bf16":
        raise ConfigError(f"train.fp8.layers={f.layers}: FP8 matmuls run in a bf16 run (bf16 weights, fp32 master "
                          f"weights in the optimizer); set train.precision=bf16 (got {cfg.train.precision})")
    if p.sequence_parallel and p.tp > 1:
        raise ConfigError(f"train.fp8.layers={f.layers}: not with parallel.sequence_parallel=true: its linears gather "
                          f"the sequence inside one bf16 autograd function; use tp={p.tp} without it, or no FP8")
    if p.cp > 1:
        raise ConfigError(f"train.fp8.layers={f.layers}: not with parallel.cp={p.cp}: the output projection is fused "
                          f"with the all-to-all in one bf16 autograd function; use cp=1, or no FP8")
    if f.min_speedup <= 0:
        raise ConfigError(f"train.fp8.min_speedup: must be > 0, got {f.min_speedup}")


def resolve(cfg: Config, world_size: int | None, *, tokenizer_vocab: int, labels: list[str] = (), examples: int = 0) -> Config:
    """The run's final config, the one every phase reads: the fields the data decides filled in,
    then every check, the layout against ``world_size`` processes included (when given). From the data: the
    vocabulary (``tokenizer_vocab``, rounded up to a multiple of VOCAB_MULTIPLE for fast matmuls and
    even tensor-parallel splits) and the sequence length the model covers; for train.task=classify,
    the labels (``labels``, the training file's, unless model.labels gives them in an order of its
    own), the longest text, and train.steps from classify.epochs over ``examples`` texts."""
    m, t, c = cfg.model, cfg.train, cfg.classify
    vocab = m.vocab_size or -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's vocabulary of {tokenizer_vocab}")
    cfg = cfg.replace("model", vocab_size=vocab, max_seq_len=m.max_seq_len or cfg.data.seq_len)
    if t.task == "classify":
        names = list(m.labels) or sorted(set(labels))
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"model.labels: a classifier needs at least two distinct labels, got {names}"
                              + ("" if m.labels else f" (those of {c.train_file})"))
        cfg = cfg.replace("model", labels=names).replace("classify", max_len=c.max_len or cfg.model.max_seq_len)
        if c.epochs:
            cfg = cfg.replace("train", steps=math.ceil(c.epochs * examples / t.global_batch))
    validate(cfg, world_size)
    return cfg


def validate_task(cfg: Config) -> None:
    """What each train.task needs: a language model has no labels; a classifier starts from a
    pretrained checkpoint (its weights and tokenizer) and reads labelled files."""
    m, t, c, p = cfg.model, cfg.train, cfg.classify, cfg.parallel
    if t.task == "lm":
        if m.labels:
            raise ConfigError(f"model.labels: {m.labels} make a classifier, which trains with train.task=classify "
                              f"(megalm finetune CKPT --task classify); a language model has none")
        return
    if not t.init_from:
        raise ConfigError("train.init_from: train.task=classify starts from a pretrained checkpoint (its weights and "
                          "tokenizer); megalm finetune CKPT --task classify sets it")
    if not c.train_file or not c.eval_file:
        raise ConfigError("classify.train_file, classify.eval_file: train.task=classify reads a .jsonl file of "
                          "{text, label} records to train on and one to score (--train and --eval)")
    if c.epochs < 0 or c.max_len < 0:
        raise ConfigError(f"classify.epochs, classify.max_len: must be >= 0, got {c.epochs} and {c.max_len}")
    if m.max_seq_len and c.max_len > m.max_seq_len:
        raise ConfigError(f"classify.max_len: {c.max_len} is longer than the model's model.max_seq_len={m.max_seq_len}")
    if m.objective == "masked" and p.pp > 1:
        raise ConfigError(f"parallel.pp: a masked (bidirectional) classifier masks each text's padding in every "
                          f"block, which megalm's pipeline does not carry between stages; use pp=1 (got {p.pp})")


def validate_model_split(cfg: Config) -> None:
    """What tensor and pipeline parallelism need of the model, whatever the number of processes."""
    m, p = cfg.model, cfg.parallel
    if m.n_heads % p.tp:
        raise ConfigError(f"parallel.tp: model.n_heads={m.n_heads} is not divisible by tp={p.tp}")
    if m.kv_heads % p.tp and p.tp % m.kv_heads:
        raise ConfigError(f"parallel.tp: model.n_kv_heads={m.kv_heads} must divide or be divisible by tp={p.tp} "
                          f"(kv heads are split over ranks, or replicated when fewer than ranks)")
    if m.ffn_dim % p.tp:
        raise ConfigError(f"parallel.tp: the MLP hidden size {m.ffn_dim} is not divisible by tp={p.tp}")
    if m.vocab_size and m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is not divisible by parallel.tp={p.tp}")
    if VOCAB_MULTIPLE % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} must divide {VOCAB_MULTIPLE} (the vocabulary is padded to a multiple of it)")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel: data.seq_len={cfg.data.seq_len} is not divisible by tp={p.tp}")
    if p.cp > 1:
        validate_context_split(cfg)
    if p.pp > 1:
        v = virtual_stages(p)
        runs = {"1f1b": (v == 1, "1 chunk"), "interleaved": (v >= 2, "2 or more chunks"), "zbv": (v == 2, "2 chunks"),
                "zb": (True, "")}[p.pp_schedule]
        if not runs[0]:
            raise ConfigError(f"parallel.virtual_stages: the {p.pp_schedule} schedule runs {runs[1]} per rank; got {v}")
        layers = m.n_layers + 3  # the embedding, the blocks, the final norm and the head
        if layers < p.pp * v:
            raise ConfigError(f"parallel.pp: {p.pp} ranks x {v} chunks need at least {p.pp * v} layers; the model has "
                              f"{layers} (model.n_layers={m.n_layers}, the embedding, the final norm and the head)")
        if cfg.train.zero_stage > 1:
            raise ConfigError(f"train.zero_stage: ZeRO stage {cfg.train.zero_stage} cannot be combined with "
                              f"parallel.pp={p.pp}: it reduces gradients during backward, which the pipeline "
                              f"schedule runs outside DeepSpeed's engine; use ZeRO stage 0 or 1")
        if cfg.train.precision == "bf16" and cfg.train.zero_stage == 0:
            raise ConfigError(f"train.zero_stage: with parallel.pp={p.pp}, bf16 uses ZeRO stage 1 (its fp32 master "
                              f"weights and gradient reduction); got train.zero_stage=0")


def virtual_stages(p: ParallelConfig) -> int:
    """Pipeline chunks per rank: ``parallel.virtual_stages``, or the schedule's own."""
    return p.virtual_stages or (2 if p.pp_schedule in ("interleaved", "zbv") else 1)


VOCAB_MULTIPLE = 128  # the model's vocabulary is the tokenizer's rounded up to this (fast matmuls, TP splits)


def validate_context_split(cfg: Config) -> None:
    """What context parallelism needs of the model and the data (megalm/parallel/context_parallel.py)."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if d.seq_len % (p.cp * (p.tp if p.sequence_parallel else 1)):
        raise ConfigError(f"parallel.cp: data.seq_len={d.seq_len} is not divisible into cp={p.cp} parts"
                          + (f" of tp={p.tp} shards each (sequence parallelism)" if p.sequence_parallel else ""))
    heads = m.n_heads // p.tp
    if heads % p.cp:
        raise ConfigError(f"parallel.cp: attention's all-to-all gives each of cp={p.cp} ranks a share of the "
                          f"{heads} query heads per tensor rank (model.n_heads={m.n_heads} / tp={p.tp}); use a cp that "
                          f"divides {heads}")
    kv = m.kv_heads // p.tp if m.kv_heads % p.tp == 0 else 1
    if kv % p.cp and p.cp % kv:
        raise ConfigError(f"parallel.cp: the {kv} key/value heads per tensor rank must divide or be divisible by "
                          f"cp={p.cp} (model.n_kv_heads={m.kv_heads}, tp={p.tp})")
    if cfg.train.task != "lm":
        raise ConfigError(f"parallel.cp: train.task={cfg.train.task} reads padded texts; context parallelism splits "
                          f"language-model sequences only (train.task=lm)")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Replicas reading different sequences (context-parallel ranks share theirs)."""
    p = cfg.parallel
    return p.dp or world_size // (p.tp * p.pp * p.cp)


def validate_layout(cfg: Config, world_size: int) -> None:
    """The parallel layout against the number of processes; how the global batch splits over it."""
    p = cfg.parallel
    model = p.tp * p.pp * p.cp
    if world_size % model:
        raise ConfigError(f"parallel: tp={p.tp} x pp={p.pp}{f' x cp={p.cp}' if p.cp > 1 else ''} does not divide the "
                          f"{world_size} processes started")
    dp = data_parallel_size(cfg, world_size)
    if dp * model != world_size:
        need = dp * model
        raise ConfigError(
            f"parallel.dp: tp={p.tp} x pp={p.pp}{f' x cp={p.cp}' if p.cp > 1 else ''} x dp={dp} needs {need} "
            f"processes, but {world_size} were started; start {need} (torchrun --nproc_per_node={need}) or leave "
            f"parallel.dp=0")
    batch = batch_layout(cfg, dp)
    validate_pipeline_batch(cfg, dp)
    if batch.padding:
        log.warning("train.global_batch: %d sequences over %d data-parallel ranks x %d micro-batches of %d leave %d "
                    "padding sequences per step (%.0f%% of the compute); a global batch that is a multiple of "
                    "%d avoids it", batch.global_batch, dp, batch.grad_accum, batch.micro_batch_size, batch.padding,
                    100 * batch.padding / (batch.global_batch + batch.padding), dp * batch.micro_batch_size)


def validate_pipeline_batch(cfg: Config, dp: int) -> None:
    """A pipeline schedule needs at least one micro-batch per pipeline rank in a step."""
    p, batch = cfg.parallel, batch_layout(cfg, dp)
    if p.pp > 1 and batch.grad_accum < p.pp:
        raise ConfigError(
            f"train.micro_batch_size: a pipeline of {p.pp} ranks needs at least {p.pp} micro-batches a step; "
            f"train.global_batch={batch.global_batch} over dp={dp} makes {batch.grad_accum} of "
            f"{batch.micro_batch_size}; use train.micro_batch_size={max(1, batch.global_batch // (dp * p.pp))} or less "
            f"(more micro-batches also shrink the pipeline's idle time, (pp - 1) / (micro-batches + pp - 1) with 1f1b)")


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch of ``global_batch`` sequences is laid out over ``dp`` ranks, as in Megatron-LM:
    each rank runs ``grad_accum`` micro-batches of ``micro_batch_size``. When dp does not divide the
    global batch, some ranks take one sequence fewer and fill the gap with padding that carries no loss.
    """

    global_batch: int
    dp: int
    micro_batch_size: int
    grad_accum: int

    @property
    def padding(self) -> int:
        return self.dp * self.micro_batch_size * self.grad_accum - self.global_batch

    def rows(self, dp_rank: int) -> range:
        """The rows of the global batch (its lanes) that data-parallel rank ``dp_rank`` takes."""
        return range(dp_rank * self.global_batch // self.dp, (dp_rank + 1) * self.global_batch // self.dp)


def batch_layout(cfg: Config, dp: int) -> BatchLayout:
    per_rank = -(-cfg.train.global_batch // dp)
    micro = min(cfg.train.micro_batch_size, per_rank)
    return BatchLayout(cfg.train.global_batch, dp, micro, -(-per_rank // micro))
