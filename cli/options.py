"""Click options generated from the library's option families (weightspace.options), declared once for every verb."""
from __future__ import annotations

import functools
import sys
from dataclasses import MISSING
from typing import Any, Callable, Iterable, Mapping

import click

from weightspace.options import (DataOptions, FixOptions, MergeOptions, ModelOptions, OpOptions,  # noqa: F401
                                 OutputOptions, ReportOptions, check_report_folder, option_fields)

__all__ = ["RegistryChoice", "merge_method_names", "soup_method_names", "use", "report_folder", "force_option", "op_options", "output_options", "analysis_outputs",
           "trained_from_options"]


class RegistryChoice(click.Choice):
    """A click choice whose names come from the registry (weightspace.registry), looked up when first needed — when
    the option is parsed or its help shown — so that building the command imports nothing heavy.

    ``names()`` returns the choices (e.g. ``ops.merge.method_names``)."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = names
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._names())
        return self._choices


def merge_method_names() -> list[str]:
    """The registered merge methods (``weightspace merge --method``, ``soup --merge``), read from the registry's
    catalogue so that ``merge --help`` needs no torch."""
    from weightspace.registry import static_entries
    return [e.name for e in static_entries("merge")]


def soup_method_names() -> list[str]:
    """The soups ``weightspace soup --method`` makes (``options.SOUP_METHODS``) whose ops the registry's catalogue
    lists, read without torch."""
    from weightspace.options import SOUP_METHODS
    from weightspace.registry import static_entries
    ops = {e.name for e in static_entries("op")}
    return [short for short, op in SOUP_METHODS.items() if op in ops]


def _click_type(meta: Mapping[str, Any]) -> Any:
    if meta["choices"]:
        return click.Choice(meta["choices"])
    if meta["min"] is not None:
        return click.IntRange(min=meta["min"]) if isinstance(meta["min"], int) else click.FloatRange(min=meta["min"])
    return meta["type"]


def use(cls: type, dest: str, *, only: Iterable[str] | None = None, required: Iterable[str] = (),
        help: Mapping[str, str] | None = None, aliases: Mapping[str, tuple[str, ...]] | None = None) -> Callable[[Callable], Callable]:
    """Declare the fields of the option family ``cls`` (all, or ``only`` these) as click options; the command
    receives one ``cls`` instance as the keyword ``dest``.

    ``required`` names fields click should require, ``help`` replaces a field's help for this verb (same meaning,
    more specific words), ``aliases`` adds flags to a field (e.g. ``--test`` for ``--data`` on soup).
    """
    chosen = [f for f in option_fields(cls)
              if only is None or f.name in set(only) or f.metadata.get("companion_of") in set(only)]
    required, help, aliases = set(required), dict(help or {}), dict(aliases or {})

    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            kw[dest] = cls(**{fl.name: kw.pop(fl.name) for fl in chosen})
            if cls is DataOptions:  # how images are decoded, for every load_data of this command wherever it is
                from weightspace.eval.data import set_decoding
                set_decoding(workers=kw[dest].workers, skip_bad=kw[dest].skip_bad, class_map=kw[dest].class_map)
            opts = kw[dest]
            # A module not imported yet still holds the defaults these would set: the header-only verbs (inspect,
            # diff) then never import the loading code, nor torch.
            if (cls is OpOptions and opts.ema == "off" and not opts.strip_prefix
                    and "weightspace.io.source_options" not in sys.modules):
                return f(*args, **kw)
            if cls is OpOptions:  # every checkpoint the verb opens, however deep in the library, reads them
                from weightspace.io.source_options import SourceOptions, default_options_for
                with default_options_for(SourceOptions(ema=opts.ema,
                                                       strip_prefix=opts.strip_prefix or None)):
                    return f(*args, **kw)
            return f(*args, **kw)

        for fl in reversed(chosen):
            meta = fl.metadata
            default = () if meta["multiple"] else (None if fl.default is MISSING else fl.default)
            flags = (*meta["flags"], *aliases.get(fl.name, ()))
            is_flag = isinstance(default, bool) or meta.get("flag_value") is not None
            kw: dict[str, Any] = {"help": help.get(fl.name, meta["help"]), "required": fl.name in required}
            if is_flag:
                kw["is_flag"] = True
                if meta.get("flag_value") is not None:
                    kw.update(flag_value=meta["flag_value"], default=default)
            else:
                kw.update(default=default, multiple=meta["multiple"], metavar=meta["metavar"],
                          type=_click_type(meta),
                          show_default=default not in (None, ()))
            wrapper = click.option(*flags, fl.name, **kw)(wrapper)
        return wrapper
    return deco


def _check_out(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    check_report_folder(value)  # a ConfigError: one line, exit 2, before any work
    return value


def report_folder(help: str | None = None, *, required: bool = False,
                  default: str | None = None) -> Callable[[Callable], Callable]:
    """--out DIR (ReportOptions.out), refusing a checkpoint's name; the command receives ``out_dir``."""
    meta = option_fields(ReportOptions)[0].metadata
    return click.option(*meta["flags"], "out_dir", default=default, show_default=default is not None,
                        required=required, metavar=meta["metavar"], callback=_check_out,
                        type=click.Path(file_okay=False), help=help or meta["help"])


def force_option(help: str = "Overwrite existing output files.") -> Callable[[Callable], Callable]:
    """--force."""
    return click.option("--force", is_flag=True, help=help)


def op_options(f: Callable) -> Callable:
    """--ema, --precision, --allow-nonfinite, --allow-expanded as an OpOptions ``ops``."""
    @functools.wraps(f)
    def with_loading(*args: Any, **kw: Any) -> Any:
        from weightspace.io.pickles import allow_expanded
        before = allow_expanded(kw["ops"].allow_expanded)  # a loading setting for this command only
        try:
            return f(*args, **kw)
        finally:
            allow_expanded(before)
    return use(OpOptions, "ops")(with_loading)


def output_options(f: Callable) -> Callable:
    """-o/--output and --format as an OutputOptions ``out``."""
    return use(OutputOptions, "out")(f)


def analysis_outputs(report_help: str) -> Callable[[Callable], Callable]:
    """The options every analysis verb ends with, in this order: the model family (--model ...), --out DIR (its
    files named in ``report_help``), --force, --json and --quiet, and --ema/--strip-prefix (read by every
    checkpoint the verb opens)."""
    from .common import report_options
    decorators = [use(ModelOptions, "model"), report_folder(report_help), force_option(), report_options,
                  use(OpOptions, "sources", only=("ema", "strip_prefix"))]

    def apply(f: Callable) -> Callable:
        for decorate in reversed(decorators):  # as if written one above the other, the first on top
            f = decorate(f)
        return f
    return apply


def trained_from_options(*, init_help: str, init_required: bool, data_help: str) -> Callable[[Callable], Callable]:
    """The options the verbs that compare a trained checkpoint with its start begin with, in this order: FINAL,
    --init CKPT (``init_help``, required when ``init_required``), --data/--transform (``data_help``) and
    --modules."""
    from .common import grouping_option
    decorators: list[Callable[[Callable], Callable]] = [
                  click.argument("final"),
                  click.option("--init", "init", required=init_required, default=None, metavar="CKPT",
                               help=init_help),
                  use(DataOptions, "data", only=("data", "transform"), required=("data",), help={"data": data_help}),
                  grouping_option]

    def apply(f: Callable) -> Callable:
        for decorate in reversed(decorators):  # as if written one above the other, the first on top
            f = decorate(f)
        return f
    return apply
