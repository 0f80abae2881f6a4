"""Every command and Python block of the README and docs/*.md runs, in order, in one fresh folder.

What runs: the ```-fenced shell blocks (no language, `bash`, `sh`, `shell`; other languages such as `text`, `json`
or `yaml` are data, not commands) and the ```python blocks of README.md, then of docs/ in this order: core,
evaluation, merge, align, repair, analysis, criticality, probes, hub, distributed, methods, results, architecture,
then any other docs/*.md in alphabetical order. Each block runs through bash (shell) or the virtual environment's
python, with the environment's `weightspace`, `python` and `torchrun` first on PATH, in one temporary folder that
holds a copy of what the commands read from the repository (recipes/, docs/, tests/hubserver.py, bench/, and a link
to .venv). A shell command may continue over `\\` lines and carry a here-document; each command's exit code must be
0, and the failing block's text, its command and its output are printed otherwise.

Within a page the working folder carries over from block to block (a `cd` in one block holds for the next ones, as in
one terminal); every page starts at the folder's root.

Sizes: `make demo` runs as `weightspace demo --small --out runs/demo --force` (the Makefile's command at the reduced
size), and `--small` is added to every `weightspace demo`. A `weightspace demo` or `weightspace recipe run` command
that is identical (after that) to one already run from the same folder is not run again: both are seeded and write
the same bytes. The loopback Hub server's port 8765 is replaced by a free port.

Not run: a block whose first line is a comment `# needs ...` (e.g. `# needs the Hub and a GPU`), a command with
such a trailing comment, and the commands listed in NOT_RUN below (file, first line, reason). An entry of NOT_RUN
that matches no command fails the test, so the list cannot rot.

`weightspace` runs as the installed entry point (weightspace_cli.main:main) in a process of its own, forked from one
that has imported torch once (see SERVER); DOCS_RUN_FORK=0 starts every command from scratch instead (slower: torch's
import costs seconds of CPU, and the docs hold over a hundred commands). DOCS_RUN_ONLY=README.md,docs/core.md runs
only those pages. Last, docs/results.md must say what the block of docs/analysis.md that generates it writes: the
same recipes and findings everywhere, and byte for byte with DOCS_RUN_EXACT=1 (the recipes are seeded and run on one
thread, but another CPU's kernels may round differently).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes: the docs train the demo's and the recipes' models at their reduced sizes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOC_ORDER = ["README.md", "docs/core.md", "docs/evaluation.md", "docs/merge.md", "docs/align.md", "docs/repair.md",
             "docs/analysis.md", "docs/criticality.md", "docs/probes.md", "docs/hub.md", "docs/distributed.md",
             "docs/methods.md", "docs/results.md", "docs/architecture.md"]
SHELL = {"", "bash", "sh", "shell"}
NEEDS = re.compile(r"#\s*needs\b")

# (file, the command's first line, why it is not run here)
NOT_RUN = [
    ("README.md", "make install", "installs into .venv: the suite already runs inside it"),
    ("README.md", "make test", "runs the whole test suite, this test included"),
    ("README.md", "make test-quick", "runs the test suite without its slow tests"),
    ("README.md", "make lint", "lints the repository, not the docs' folder"),
    ("README.md", "make bench", "benchmarks take minutes and print figures, no pass/fail"),
    ("docs/core.md", "python bench/soup_io.py --only ab --dtypes fp32 --reps 3",
     "a benchmark writing ~1 GB of temporary files"),
    ("docs/core.md", "python bench/pt_memory.py --sizes 2,8 --mb 10", "a benchmark: it prints figures, no pass/fail"),
    ("docs/analysis.md", "weightspace recipe run recipes/what-is-transferred.yaml --out runs/wit-full",
     "the full-size recipe; its --small run is the first command of the page"),
    ("docs/analysis.md", "weightspace recipe run recipes/what-is-transferred.yaml --out runs/wit-init7 "
     "--set \"train.init_seeds=[7]\" --set analyses.barriers.steps=21", "a full-size recipe run"),
    ("docs/repair.md", "weightspace recipe run recipes/align-barrier.yaml --out runs/align-full",
     "the full-size recipe; the --small run beside it runs"),
    ("docs/analysis.md", "weightspace recipe run recipes/head2toe-targets.yaml --out runs/h2t --force",
     "a full-size recipe run; its --small run is the command of its section"),
    ("docs/analysis.md", "weightspace recipe run recipes/trajectory.yaml --out runs/trajectory --force",
     "a full-size recipe run; its --small run is the command of its section"),
    ("docs/analysis.md", "weightspace recipe run recipes/cross-domain.yaml --out runs/cross-domain --force",
     "a full-size recipe run; its --small run is the command of its section"),
    ("docs/analysis.md", "weightspace recipe run recipes/saturation-pairs.yaml --out runs/saturation --force",
     "a full-size recipe run; its --small run is the command of its section"),
    ("docs/analysis.md", "weightspace recipe summary runs/h2t runs/trajectory runs/cross-domain runs/saturation "
     "-o docs/results-full.md --force \\", "summarises the full-size runs above, which are not run here"),
]
MAKE_DEMO = "weightspace demo --small --out runs/demo --force"

# A process that has imported torch and the other heavy libraries forks one child per command: each child takes the
# client's cwd, environment, argv and stdin/stdout/stderr (passed over a Unix socket) and runs the installed entry
# point (weightspace_cli.main:main), or a Python block as a script. Importing torch costs ~2 s of CPU, and the docs
# hold over a hundred commands. huggingface_hub and timm are not imported before the fork: huggingface_hub reads
# HF_ENDPOINT and HF_HUB_OFFLINE when imported, and the commands set them.
SERVER = r"""
import atexit, io, json, os, runpy, signal, socket, struct, sys, traceback
import numpy, torch, torchvision, safetensors.torch, scipy.optimize, sklearn.datasets, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import click, weightspace_cli.main

def child(conn):
    head = conn.recv(4)
    size = struct.unpack("!I", head)[0]
    msg, fds, _, _ = socket.recv_fds(conn, size, 3)
    req = json.loads(msg)
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.stderr = open(2, "w", closefd=False, encoding="utf-8", errors="backslashreplace", buffering=1)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [req["script"]] if req["script"] else req["argv"]
    code = 0
    try:
        if req["script"]:
            sys.path.insert(0, os.path.dirname(req["script"]))
            runpy.run_path(req["script"], run_name="__main__")
        else:
            weightspace_cli.main.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush(); sys.stderr.flush()
    finally:
        conn.sendall(struct.pack("!i", code))
        os._exit(code)

signal.signal(signal.SIGCHLD, signal.SIG_IGN)
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(16)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    if os.fork() == 0:
        srv.close()
        child(conn)
    conn.close()
"""
CLIENT = r"""
import json, os, socket, struct, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.environ["DOCS_RUN_SERVER"])
script = os.environ.pop("DOCS_RUN_SCRIPT", "")
msg = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "script": script}).encode()
sock.sendall(struct.pack("!I", len(msg)))
socket.send_fds(sock, [msg], [0, 1, 2])
code = sock.recv(4)
sys.exit(struct.unpack("!i", code)[0] if len(code) == 4 else 1)
"""
HUB_PORT = "8765"


@dataclass
class Step:
    """One command of a shell block (continuation lines joined, here-document attached), or a whole Python block."""
    text: str
    first: str
    skip: str | None = None


@dataclass
class Block:
    """A fenced block of one doc file: where it starts, its language and its steps."""
    doc: str
    line: int
    lang: str
    text: str
    steps: list[Step] = field(default_factory=list)

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def fenced_blocks(doc: str) -> list[Block]:
    """The ```-fenced blocks of one file, in order (indented fences inside lists count too)."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start, body = len(m.group(1)), m.group(2).lower(), i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        blocks.append(Block(doc, start, lang, "\n".join(body)))
    return blocks


def shell_steps(text: str) -> list[Step]:
    """Split a shell block into commands: `\\` continuations joined, here-documents kept with their command."""
    lines, steps, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        first, parts = re.sub(r"\s+#\s.*$", "", line.strip()), [line]
        while parts[-1].rstrip().endswith("\\") and i < len(lines):
            parts.append(lines[i])
            i += 1
        for m in re.finditer(r"<<-?\s*(['\"]?)(\w+)\1", "\n".join(parts)):
            end = m.group(2)
            while i < len(lines):
                parts.append(lines[i])
                i += 1
                if lines[i - 1].strip() == end:
                    break
        text_ = "\n".join(parts)
        head = text_.split("\n", 1)[0]
        trailing = re.search(r"\s#\s*needs\b.*$", head)
        steps.append(Step(text_, first, f"marked: {trailing.group(0).strip()}" if trailing else None))
    return steps


def doc_files() -> list[str]:
    """README.md, then docs/*.md in DOC_ORDER, then the other pages alphabetically."""
    return DOC_ORDER + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in DOC_ORDER)


def collect() -> list[Block]:
    """Every runnable block of the docs, in document order, with its steps and what is not run."""
    docs = doc_files()
    out = []
    for doc in docs:
        if not (ROOT / doc).exists():
            continue
        for b in fenced_blocks(doc):
            if b.lang not in SHELL and b.lang != "python":
                continue
            first = next((ln.strip() for ln in b.text.splitlines() if ln.strip()), "")
            marked = first if NEEDS.match(first) else None
            if b.lang == "python":
                b.steps = [Step(b.text, first, f"marked: {marked}" if marked else None)]
            else:
                b.steps = shell_steps(b.text)
                for s in b.steps:
                    if marked:
                        s.skip = f"marked: {marked}"
            out.append(b)
    return out


def small(cmd: str) -> str:
    """The reduced size of a command: `make demo` → the small demo; `--small` added to `weightspace demo`."""
    if cmd.strip().split("#")[0].strip() == "make demo":
        return MAKE_DEMO
    return re.sub(r"^(\s*weightspace demo)(?![^\n]*--small)", r"\1 --small", cmd)


def free_port() -> int:
    """A TCP port nobody listens on now (for the loopback Hub server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_docs_run_in_order(tmp_path):
    blocks = collect()
    listed = {(doc, first): why for doc, first, why in NOT_RUN}
    used = set()
    for b in blocks:
        for s in b.steps:
            if (b.doc, s.first) in listed and s.skip is None:
                s.skip = listed[(b.doc, s.first)]
                used.add((b.doc, s.first))
    stale = [f"{doc}: {first!r}" for doc, first in listed if (doc, first) not in used]

    work = tmp_path / "clone"
    work.mkdir()
    for name in ("recipes", "docs", "bench"):
        shutil.copytree(ROOT / name, work / name)
    (work / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "hubserver.py", work / "tests" / "hubserver.py")
    (work / ".venv").symlink_to(BIN.parent)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # no Hub: a closed loopback port answers at once (a block that starts the loopback Hub server sets its own)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path / "home"),
               HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               WEIGHTSPACE_HASH_CACHE=str(tmp_path / "sha256.json"), MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    only = os.environ.get("DOCS_RUN_ONLY")  # while editing one page: DOCS_RUN_ONLY=docs/core.md,docs/merge.md
    assert only or not stale, "NOT_RUN lists commands no doc has any more (remove them): " + "; ".join(stale)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    port = str(free_port())
    server = None
    if os.environ.get("DOCS_RUN_FORK", "1") != "0":  # DOCS_RUN_FORK=0: every command a fresh `weightspace` process
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "weightspace").write_text(f"#!{BIN / 'python'} -IS\n{CLIENT}")
        (shim / "weightspace").chmod(0o755)
        env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
        env["DOCS_RUN_SERVER"] = str(tmp_path / "server.sock")
        (scratch / "server.py").write_text(SERVER)
        server = subprocess.Popen([str(BIN / "python"), str(scratch / "server.py"), env["DOCS_RUN_SERVER"]],
                                  env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert server.stdout.readline().strip() == "ready"
    try:
        run_blocks(blocks, work, scratch, env, port, server is not None, only)
    finally:
        if server is not None:  # the server and any command it still runs (its children share its group)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def run_blocks(blocks: list[Block], work: Path, scratch: Path, env: dict, port: str, forked: bool,
               only: str | None) -> None:
    """Run the blocks in order from ``work``; fail with every failing block's text and output."""
    ran, failures, timings, done = 0, [], [], set()
    page, cwd = None, work
    for n, b in enumerate(blocks):
        if only and b.doc not in only.split(","):
            continue
        if b.doc != page:
            page, cwd = b.doc, work
        todo = [s for s in b.steps if s.skip is None]
        if not todo:
            continue
        block_env = env
        if b.lang == "python":
            script = scratch / f"block{n}.py"
            script.write_text(b.text + "\n")
            cmd = [str(BIN / "python"), str(script)]
            if forked:
                cmd = [str(BIN / "python"), "-IS", str(Path(env["PATH"].split(os.pathsep)[0]) / "weightspace")]
                block_env = dict(env, DOCS_RUN_SCRIPT=str(script))
        else:
            lines, here = [], cwd  # here: the folder this step runs in, while plain `cd DIR` steps tell it
            for k, s in enumerate(b.steps):
                if s.skip is not None:
                    continue
                text = small(s.text).replace(HUB_PORT, port)
                bare = re.sub(r"\s+#\s[^\n]*", "", text).strip()
                if here is not None and re.match(r"weightspace (demo|recipe run)\b", bare):
                    key = (str(here), " ".join(t for t in bare.split() if t not in ("-q", "--quiet")))
                    if key in done:
                        continue
                    done.add(key)
                step_cd = re.fullmatch(r"cd\s+([\w./-]+)", bare)
                if step_cd and here is not None:
                    here = Path(os.path.normpath(here / step_cd.group(1)))
                elif re.search(r"(^|[;&|]\s*)cd\b", bare):
                    here = None
                lines.append(f"{text}\nrc=$?; if [ $rc -ne 0 ]; then echo \"@@docs-run: command {k} exit $rc\" >&2; "
                             f"exit 97; fi")
            lines.append(f"pwd > {shlex.quote(str(scratch / 'cwd'))}")
            script = scratch / f"block{n}.sh"
            script.write_text("\n".join(lines) + "\n")
            cmd = ["bash", str(script)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=block_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            try:  # a command forked by the server may still hold the pipes
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            err += "\n(timed out after 600 s)"
        finally:
            try:  # a block may leave a server behind (`... &`): end its process group
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        timings.append((time.perf_counter() - start, b.where()))
        ran += 1
        if b.lang != "python" and (scratch / "cwd").exists() and proc.returncode == 0:
            cwd = Path((scratch / "cwd").read_text().strip())
            (scratch / "cwd").unlink()
        if proc.returncode != 0:
            m = re.search(r"@@docs-run: command (\d+) exit (\d+)", err)
            what = b.steps[int(m.group(1))].text if m else b.text
            failures.append(f"--- {b.where()} (exit {m.group(2) if m else proc.returncode}) in {cwd}\n"
                            f"command:\n{what}\n--- stderr (tail):\n{err[-3000:]}\n--- stdout (tail):\n{out[-1500:]}")
    total = sum(t for t, _ in timings)
    print(f"{ran} blocks in {total:.0f} s; slowest: " +
          ", ".join(f"{w} {t:.1f} s" for t, w in sorted(timings, reverse=True)[:8]))
    assert not failures, f"{len(failures)} doc block(s) failed:\n\n" + "\n\n".join(failures)
    if not only:  # the figures the docs quote come from docs/results.md, which one block regenerates: it must match
        made, committed = (work / "docs" / "results.md").read_text(), (ROOT / "docs" / "results.md").read_text()
        hint = ("docs/results.md is not what `weightspace recipe summary` writes now: run the block of "
                "docs/analysis.md that generates it, from the repository root, and commit the result")
        assert results_skeleton(made) == results_skeleton(committed), hint
        if os.environ.get("DOCS_RUN_EXACT") == "1":
            assert made == committed, hint


def results_skeleton(page: str) -> list[str]:
    """What docs/results.md says whatever machine ran the recipes: its headings, each recipe's description line and
    each finding's text. The numbers and verdicts of seeded CPU training are reproducible on one machine but may
    differ in the last digits on another CPU (other SIMD kernels), so they are compared only with
    DOCS_RUN_EXACT=1 (run it so after a change that moves recipe numbers, on the machine that regenerates the page)."""
    out = []
    for line in page.splitlines():
        if line.startswith(("#", "Recipe kind")):
            out.append(line)
        elif line.startswith("| ") and not line.startswith(("| finding", "|---")):
            out.append(line.split(" | ")[0])
    return out

