"""The `weightspace` command: a lazy click group so `--help` never imports torch."""
from __future__ import annotations

import importlib
import re
import sys

import click

__all__ = ["COMMANDS", "HELP", "LazyGroup", "flags_of", "in_flags", "main"]

# verb -> "module:function"; each verb lives in its own file and is imported only when run.
COMMANDS: dict[str, str] = {
    "inspect": "weightspace_cli.inspect_cmd:inspect_cmd",
    "diff": "weightspace_cli.diff:diff",
    "soup": "weightspace_cli.soup:soup",
    "interpolate": "weightspace_cli.interpolate:interpolate",
    "distance": "weightspace_cli.distance:distance",
    "demo": "weightspace_cli.demo:demo",
    "probe": "weightspace_cli.probe:probe",
    "head2toe": "weightspace_cli.head2toe:head2toe",
    "saturation": "weightspace_cli.saturation:saturation",
    "leaderboard": "weightspace_cli.leaderboard:leaderboard",
    "push": "weightspace_cli.push:push",
    "merge": "weightspace_cli.merge:merge",
    "methods": "weightspace_cli.methods:methods",
    "align": "weightspace_cli.align:align",
    "modules": "weightspace_cli.modules_cmd:modules_cmd",
    "rewind": "weightspace_cli.rewind:rewind",
    "criticality": "weightspace_cli.criticality:criticality",
    "similarity": "weightspace_cli.similarity:similarity",
    "recipe": "weightspace_cli.recipe:recipe",
    "data": "weightspace_cli.data_cmd:data",
}
HELP: dict[str, str] = {
    "inspect": "Keys, shapes, dtypes, parameter count, bytes and provenance of a checkpoint.",
    "diff": "Keys only in one checkpoint, and shape/dtype mismatches.",
    "soup": "Average checkpoints: uniform, weighted, or greedy on validation data.",
    "interpolate": "Interpolate two checkpoints: one point, or a barrier curve with evaluation.",
    "distance": "L2 distance, relative distance and cosine between two checkpoints.",
    "demo": "Train small real models on real data, then soups, leaderboards and barrier curves.",
    "probe": "Linear probe accuracy at every layer of checkpoints (accuracy vs depth).",
    "head2toe": "Head2Toe: a linear head on features selected from every layer, vs the last-layer probe.",
    "saturation": "Fit downstream vs upstream accuracy: e_DS = k·e_US^α + e_∞ on the upper hull.",
    "leaderboard": "Evaluate and rank checkpoints on data (e.g. which pre-training checkpoint transfers best).",
    "push": "Push a checkpoint to the Hugging Face Hub with a model card and a timm/open_clip config.",
    "merge": "Merge fine-tunes of one base: task arithmetic or TIES.",
    "methods": "Every op, merge method and recipe kind: formula, paper and defaults (the registry).",
    "align": "Permute B's hidden units to match A (Git Re-Basin weight or activation matching).",
    "modules": "The modules analyses work on (tree:layer|block|stage, depth:N, regex:P) with parameter counts.",
    "rewind": "Rewind one module at a time to INIT, a checkpoint or a random draw; heat map of the damage.",
    "criticality": "Module criticality (Chatterji et al.): μ per module (σ by bisection at each α), Σμ.",
    "similarity": "CKA per module output, L2 per module, and which examples only one model gets right.",
    "recipe": "Run experiment recipes (YAML) that reproduce paper findings, e.g. what-is-transferred.",
    "data": "The decoded-data cache: ls (what is cached, how big, for which transform) and rm.",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; bad input becomes one line and exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, HELP.get(n, "")) for n in self.list_commands(ctx)])

    def invoke(self, ctx: click.Context):
        from .common import echo
        from .oneline import held_output, one_line
        # the verb, for usage errors that click raises without a context (an option missing its value)
        verb = next(iter([*getattr(ctx, "_protected_args", []), *ctx.args]), "")
        with held_output() as state:  # library logs and warnings are shown after success, never before an error line
            try:
                return super().invoke(ctx)
            except click.UsageError as e:  # bad options: one line too, naming the verb and where help is
                state["failed"] = True
                where = e.ctx.command_path if e.ctx else " ".join([ctx.command_path] + [verb] * (verb in COMMANDS))
                echo(f"weightspace: error{_speak()}: {one_line(where)}: {one_line(e.format_message())} "
                           f"(see {where} --help)", err=True)
                sys.exit(2)
            except Exception as e:  # only our own error family is turned into one line; bugs keep their traceback
                errors = sys.modules.get("weightspace.errors")  # not imported yet → not ours (keeps --help torch-free)
                if errors is not None and isinstance(e, errors.WeightspaceError):
                    state["failed"] = True
                    message = in_flags(str(e), e.param, self.get_command(ctx, verb) if verb in COMMANDS else None)
                    echo(f"weightspace: error{_speak()}: {one_line(message)}", err=True)
                    sys.exit(2)
                raise


def flags_of(command: click.Command | None) -> dict[str, str]:
    """Library parameter → the command's flag, from the option metadata: every option of ``command`` (and of its
    subcommands) by its click name and by its flag, and the option families' fields that feed a library parameter
    of another name (``MergeOptions.scales`` feeds ``grid``)."""
    from weightspace import options as families
    out: dict[str, str] = {}
    for cls in (families.MergeOptions, families.OpOptions, families.OutputOptions, families.ModelOptions,
                families.DataOptions, families.FixOptions):
        for f in families.option_fields(cls):
            if f.metadata.get("param"):
                out[f.metadata["param"]] = f.metadata["flags"][-1]
    commands = [command] if command is not None else []
    while commands:
        cmd = commands.pop()
        commands += list(getattr(cmd, "commands", {}).values())
        for p in cmd.params:
            longs = [o for o in p.opts if o.startswith("--")]
            if isinstance(p, click.Option) and longs and p.name:
                out.setdefault(p.name, longs[0])
                for o in longs:
                    out.setdefault(o[2:].replace("-", "_"), o)
    return out


# Advice in a library message names a Python argument: ``use allow_nonfinite=True``, ``use device='cpu'``.
_ADVICE = re.compile(r"\b([a-z_][a-z0-9_]*)=(True|'[^'\s]*')")


def in_flags(message: str, param: str | None, command: click.Command | None) -> str:
    """A library error's message in the command's words: its leading parameter (``keep=0: ...``, ``model: ...``)
    becomes the flag that sets it (``--keep 0: ...``), and advice naming an argument (``use force=True``,
    ``use device='cpu'``) the flag (``use --force``, ``use --device cpu``); what has no flag here is unchanged."""
    flags = flags_of(command)

    def advice(m: re.Match) -> str:
        flag = flags.get(m.group(1))
        if not flag:
            return m.group(0)
        return flag if m.group(2) == "True" else f"{flag} {m.group(2)[1:-1]}"

    flag = flags.get(param) if param else None
    if flag and param and message.startswith(param) and message[len(param):len(param) + 1] in "=: ":
        rest = message[len(param):]
        message = flag + (" " + rest[1:] if rest.startswith("=") else rest)
    return _ADVICE.sub(advice, message)


def _speak() -> str:
    """Under torchrun, let a silenced rank's error line through, tagged with its rank ("" otherwise)."""
    dist = sys.modules.get("weightspace.eval.distributed")
    return dist.restore_output() if dist else ""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="weightspace")
def main() -> None:
    """weightspace — what lies between your checkpoints.

    Load checkpoints from anywhere (.safetensors, .pt/.pth/.bin, sharded folders, hf://org/repo,
    timm:NAME, open_clip:ARCH/TAG), combine them (soups, interpolation, task vectors), measure them
    (distances, barrier curves, leaderboards) and write safetensors with provenance.

    Bad input prints one line naming the file and the problem and exits with code 2.
    Under torchrun (WORLD_SIZE > 1) the ranks join one process group and only rank 0 prints and writes files.
    """
    import os
    if (os.environ.get("WORLD_SIZE") or "1") != "1":  # launched by torchrun: torch is needed now anyway
        from weightspace import files
        from weightspace.eval import distributed
        distributed.init_from_env()
        ctx = click.get_current_context()
        ctx.call_on_close(distributed.teardown)
        if not distributed.is_main():
            # The CLI's rule, not the library's: every rank computes the same results, rank 0 alone prints them
            # and writes the files (the library itself always writes, so ws.save works inside a user's DDP job).
            distributed.silence_other_ranks()
            before = files.discard_writes(True)
            ctx.call_on_close(lambda: files.discard_writes(before))


if __name__ == "__main__":
    main()
