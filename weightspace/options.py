"""The option families shared by the verbs, declared once: each a dataclass the library takes and the CLI turns
into command-line options (``weightspace_cli.options.use``), as mergekit's ``MergeOptions`` is.

One vocabulary across verbs: ``--val DATA`` selection data (greedy and learned soups, choosing λ), ``--data DATA``
evaluation data shown in reports (repeatable), ``--train DATA`` fitting data (probes), ``-o FILE`` the weights
written, ``--out DIR`` the report folder (never a checkpoint's name), ``--device auto|cpu|cuda[:N]``.

Each field's metadata holds its flags, metavar, help and limits; this module imports nothing but the standard
library, so a verb's ``--help`` stays free of torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import ConfigError

__all__ = ["EmaChoice", "EMA_CHOICES", "ema_choice", "SOUP_METHODS", "ModelOptions", "DataOptions", "FixOptions", "MergeOptions", "OpOptions", "DEFAULT_SCALES", "OutputOptions", "ReportOptions", "option_fields",
           "CHECKPOINT_SUFFIXES", "check_report_folder"]

# Which weights a source gives when its file holds EMA weights too: "off" the regular ones (noted when EMA weights
# are present), "prefer" the EMA ones where present (timm's use_ema), "require" the EMA ones or an error.
EmaChoice = Literal["off", "prefer", "require"]
EMA_CHOICES: tuple[EmaChoice, ...] = get_args(EmaChoice)


def ema_choice(ema: EmaChoice | bool | None, default: EmaChoice = "off") -> EmaChoice:
    """The EMA choice a library ``ema=`` argument means: None is ``default``; a bool is the older spelling (True
    "prefer", as timm's ``use_ema``; False "off").

    Raises:
        ConfigError: a string that is not one of EMA_CHOICES (``param="ema"``).
    """
    if ema is None:
        return default
    if isinstance(ema, bool):
        return "prefer" if ema else "off"
    if ema not in EMA_CHOICES:
        raise ConfigError(f"ema={ema!r}: expected one of {', '.join(EMA_CHOICES)}", param="ema")
    return ema


# The soups ``weightspace soup --method`` makes (``search.soups.evaluate_soups``): short name → the op it registers.
SOUP_METHODS = {"uniform": "uniform-soup", "weighted": "weighted-average", "greedy": "greedy-soup",
                "learned": "learned-soup"}

# Names a report folder may not take: they are what a user means as a checkpoint file.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar")


def _opt(default: Any, *flags: str, help: str, metavar: str | None = None, choices: tuple[str, ...] | None = None,
         min: int | float | None = None, multiple: bool = False, type: type | None = None,
         companion_of: str | None = None, flag_value: Any = None, param: str | None = None) -> Any:
    # companion_of: declared wherever that field is (decoding options go wherever data is loaded); flag_value: a
    # flag that sets a non-bool field (--ema sets ema="prefer"); param: the library parameter the field feeds when
    # it is named otherwise (errors name it; the CLI turns it back into the flag)
    meta = {"flags": flags, "help": help, "metavar": metavar, "choices": choices, "min": min, "multiple": multiple,
            "type": type, "companion_of": companion_of, "flag_value": flag_value, "param": param}
    if multiple:
        return field(default_factory=tuple, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelOptions:
    """The model that evaluated checkpoints are loaded into, and where it runs."""

    model: str | None = _opt(None, "--model", metavar="SPEC",
                             help="timm:NAME, open_clip:ARCH or pkg.module:factory (e.g. weightspace.eval.zoo:small_cnn).")
    num_classes: int | None = _opt(None, "--num-classes", min=1,
                                   help="Classifier outputs (default: from the checkpoint, else the first dataset).")
    in_chans: int | None = _opt(None, "--in-chans", min=1,
                                help="Input channels of the model (timm; e.g. 1 for grey digits).")
    batch_size: int | None = _opt(None, "--batch-size", min=1,
                                  help="Evaluation batch size (default: on the CPU the largest whose activations fit "
                                       "a memory budget, printed; 256 on a GPU).")
    device: str = _opt("auto", "--device", help="auto, cpu or cuda[:N].")
    parallel: str = _opt("data", "--parallel", choices=("data", "points"),
                         help="Under torchrun: shard the data of every evaluation across the ranks (data), or deal "
                              "whole sweep points (α points, checkpoints) out to the ranks (points).")


@dataclass
class DataOptions:
    """The three roles data plays: selection (--val), evaluation shown in reports (--data) and fitting (--train).

    A DATA spec is digits:test, mnist1d:test, a .pt/.npz file or an image folder (docs/evaluation.md).
    """

    val: str | None = _opt(None, "--val", metavar="DATA",
                           help="Selection data: ranks ingredients, drives greedy and learned soups, picks λ.")
    data: tuple[str, ...] = _opt((), "--data", metavar="DATA", multiple=True,
                                 help="Evaluation data shown in the report (repeat for several).")
    train: str | None = _opt(None, "--train", metavar="DATA", help="Fitting data: what probes and heads are trained on.")
    transform: str | None = _opt(None, "--transform", metavar="SPEC",
                                 help="Transform every dataset once, after its normalisation: block-shuffle:B[:SEED] "
                                      "(B×B blocks, one fixed seeded permutation) or invert (x ↦ −x); chain with '+'.")
    workers: int | None = _opt(None, "--workers", min=0, companion_of="transform",
                               help="Processes decoding images (default: every core; 0: in this process).")
    skip_bad: bool = _opt(False, "--skip-bad", companion_of="transform",
                          help="Leave out images that cannot be decoded (their count is reported) instead of failing.")
    class_map: str | None = _opt(None, "--class-map", metavar="FILE", companion_of="transform",
                                 help="Map the classes of every dataset that does not match the model's outputs one "
                                      "to one (lines 'DATASET_CLASS MODEL_CLASS[,...]'; a spec's own ?classes=FILE "
                                      "wins); without a map such a dataset is refused.")

    def one(self, verb: str) -> str:
        """The single --data spec of a verb that compares on one dataset.

        Raises:
            ConfigError: none or several given.
        """
        if len(self.data) != 1:
            raise ConfigError(f"{verb}: give exactly one --data DATA (got {len(self.data)})")
        return self.data[0]


@dataclass
class FixOptions:
    """Data that fixes every evaluated model first: BatchNorm statistics re-estimated, or REPAIR (docs/repair.md)."""

    recalibrate_bn: str | None = _opt(None, "--recalibrate-bn", metavar="DATA",
                                      help="Re-estimate BatchNorm statistics on DATA before every evaluation.")
    repair: str | None = _opt(None, "--repair", metavar="DATA",
                              help="REPAIR before every evaluation: rescale each channel so its activation mean/std "
                                   "on DATA match the target statistics (docs/repair.md).")


# The λ grid a merge is searched over on --val (merge --val, soup --merge).
DEFAULT_SCALES = "0.2,0.4,0.6,0.8,1.0,1.2,1.5"


@dataclass
class MergeOptions:
    """A merge of fine-tunes onto their base: the base, the λ grid tried on --val, TIES's kept fraction."""

    base: str | None = _opt(None, "--base", metavar="CKPT",
                            help="The pre-trained checkpoint the models were fine-tuned from.")
    scales: str = _opt(DEFAULT_SCALES, "--scales", param="grid", help="The grid of λ tried on --val.")
    keep: float | None = _opt(None, "--keep", type=float,
                              help="ties: fraction of each task vector kept (largest magnitudes over the whole model; "
                                   "default: the method's, see `weightspace methods`).")


@dataclass
class OpOptions:
    """How ops read and combine checkpoints."""

    ema: EmaChoice = _opt("off", "--ema", flag_value="prefer", help="Take EMA weights wherever a file holds them (default: the regular weights, "
                                          "with a note when EMA weights are present); per source: PATH?ema=1 (EMA "
                                          "required) or PATH?ema=0.")
    strip_prefix: str | None = _opt(None, "--strip-prefix", metavar="PREFIX",
                                    help="Keep only keys starting with PREFIX, with it removed (e.g. 'model.' of a "
                                         "Lightning checkpoint); per source: PATH?strip_prefix=PREFIX.")
    precision: str = _opt("fp32", "--precision", choices=("fp32", "fp64"),
                          help="Accumulation precision for floating tensors (results are cast back to the stored dtype).")
    allow_nonfinite: bool = _opt(False, "--allow-nonfinite", help="Combine tensors holding NaN/Inf instead of refusing.")
    allow_expanded: bool = _opt(False, "--allow-expanded",
                                help="Read pickled tensors that are larger written out than stored (stride-0 or "
                                     "overlapping views) instead of refusing them.")
    buffers: str = _opt("mean", "--buffers", choices=("mean", "first", "recalibrate"),
                        help="Running statistics (BatchNorm) of the result: mean = the inputs' convex mean (the op's "
                             "weights when convex, else uniform; never extrapolated), first = the first input's (a "
                             "merge's base), recalibrate = re-estimated on --recalibrate-bn DATA.")
    max_memory: str | None = _opt(None, "--max-memory", metavar="SIZE",
                                  help="Memory for the pieces being combined, e.g. 256M or 4G (default: an eighth of "
                                       "one checkpoint, 4 MiB to 1 GiB); every core combines pieces, and the output "
                                       "is the same whatever the size.")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the streaming ops (ops.stream, ops.merge); ``allow_expanded`` is a setting of
        loading (io.pickles.allow_expanded), not of the ops."""
        return {"ema": self.ema, "precision": self.precision, "allow_nonfinite": self.allow_nonfinite,
                "max_memory": self.max_memory, "buffers": self.buffer_policy()}

    def buffer_policy(self) -> str:
        """The ops' running-statistics policy: ``recalibrate`` starts from the convex mean, which the re-estimation
        on data then replaces."""
        return "mean" if self.buffers == "recalibrate" else self.buffers

    def check_buffers(self, recalibrate_bn: str | None, verb: str) -> None:
        """Refuse ``--buffers recalibrate`` without ``--recalibrate-bn DATA`` and another policy with it.

        Raises:
            ConfigError: the two options disagree."""
        if self.buffers == "recalibrate" and not recalibrate_bn:
            raise ConfigError(f"{verb}: --buffers recalibrate needs --recalibrate-bn DATA (the data the statistics "
                              f"are re-estimated on)", param="buffers")
        if recalibrate_bn and self.buffers == "first":
            raise ConfigError(f"{verb}: --recalibrate-bn re-estimates the running statistics; drop --buffers first",
                              param="buffers")


@dataclass
class OutputOptions:
    """The weights a verb writes."""

    output: str | None = _opt(None, "-o", "--output", metavar="FILE",
                              help="Where the weights are written: FILE.safetensors, FILE.pt|.pth|.bin (a plain state "
                                   "dict, provenance in FILE.weightspace.json), or DIR/ (a Hugging Face folder).")
    fmt: str | None = _opt(None, "--format", choices=("safetensors", "pt"),
                           help="Output format (default: from the extension; safetensors unless .pt/.pth/.bin).")
    dtype: str | None = _opt(None, "--dtype", choices=("bf16", "fp16", "fp32"),
                             help="Output dtype of floating tensors (default: each tensor's stored dtype, the widest "
                                  "of the inputs' where they differ).")
    max_shard_size: str = _opt("5GB", "--max-shard-size", metavar="SIZE",
                               help="Shard a folder output past SIZE (5GB, 500MB, 2GiB); a single file past it is "
                                    "refused.")
    hf_folder: bool = _opt(False, "--hf-folder",
                           help="Write -o as a Hugging Face folder (as a path ending in '/' does): model.safetensors "
                                "or shards with their index, plus config.json and tokenizer files of the first input.")

    def target(self) -> str:
        """The -o path; the verbs that save make -o required or check it before any work.

        Raises:
            ConfigError: no -o was given.
        """
        if not self.output:
            raise ConfigError("-o/--output is required to write weights")
        return self.output

    def save_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``weightspace.save`` these options set (besides the path and --format)."""
        return {"fmt": self.fmt, "dtype": self.dtype, "max_shard_size": self.max_shard_size,
                "folder": True if self.hf_folder else None}


@dataclass
class ReportOptions:
    """The report folder a verb writes (results.json, CSV, PNG)."""

    out: str | None = _opt(None, "--out", metavar="DIR",
                           help="Folder for the report: results.json, CSV and PNG files (weights go to -o).")


def option_fields(cls: type) -> list:
    """The dataclass fields of an option family (with their flags, help, metavar, choices, min, multiple)."""
    return list(fields(cls))


def check_report_folder(out: str | None) -> None:
    """Refuse a report folder named like a checkpoint file (``--out soup.safetensors`` means ``-o``).

    Raises:
        ConfigError: ``out`` ends in a checkpoint suffix; the message suggests -o.
    """
    if out and Path(out).suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"--out {out}: --out is the report folder and never takes a checkpoint's name; "
                          f"write the weights with -o {out}")
