"""Every command in README.md and docs/*.md is run or validated here, so none can rot.

The commands are read from the Markdown itself: fenced and indented code blocks (a block holds
commands when its first line starts with a known program) and commands quoted in prose
(`retrieval evaluate --whole`). RULES decides for each whether it is RUN for real, in a sandbox
laid out like a checkout beside ../shared with BUDGET options appended where the documented run
takes minutes, or VALIDATED: subcommand, options and choices against the click objects of
`retrieval.cli`, the Makefile's recipe, torchrun's own parser. A test id names the file and line
(`test_documented_command[README.md:41]`), so a failure says which documented command rotted."""
import importlib.util
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import numpy as np
import pytest
from PIL import Image

from retrieval.cli import DEFAULT_PRESET, main
from tests.test_cli import SHARED, _celeba

REPO = Path(__file__).resolve().parents[1]
DOCS = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
        for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
BIN = Path(sys.executable).parent  # this interpreter's scripts: retrieval, torchrun
PROGRAMS = {"retrieval", "make", "curl", "torchrun", "python", ".venv/bin/python"}
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
ENV_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # DATA, NAME, KEY, N: a word the reader replaces
DOC_BASE = "http://127.0.0.1:5000"  # the address the curl examples use; rewritten to the test server


# --- reading the commands out of the Markdown ---------------------------------------------------

@dataclass(frozen=True)
class Command:
    doc: str  # "README.md", "docs/api.md"
    line: int
    text: str  # one shell command: trailing comment stripped, `\` continuations joined
    inline: bool = False  # quoted in prose rather than a code block

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def program(self) -> str:
        """The first word after any VAR=value prefixes."""
        return program_of(self.text)

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def args(self) -> list[str]:
        """The words after the program (and its VAR=value prefixes)."""
        words = self.words
        start = next(i for i, w in enumerate(words) if not ENV_ASSIGN.fullmatch(w))
        return words[start + 1:]


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of its first content line
    lang: str
    lines: tuple[str, ...]


def program_of(text: str) -> str:
    return next((w for w in text.split() if not ENV_ASSIGN.fullmatch(w)), "")


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment`: a # that starts a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def code_blocks(doc: str, text: str) -> tuple[list[Block], str]:
    """Fenced and indented code blocks, and the prose with them blanked out (line numbers kept)."""
    lines = text.splitlines()
    blocks, prose, body, indented = [], [], [], []
    fence, start = None, 0
    for n, line in enumerate(lines, 1):
        if fence is not None:
            if line.strip() == "```":
                blocks.append(Block(doc, start, fence, tuple(body)))
                fence = None
            else:
                body.append(line)
            prose.append("")
            continue
        if indented and not line.startswith("    "):
            blocks.append(Block(doc, n - len(indented), "", tuple(indented)))
            indented = []
        if m := re.fullmatch(r"\s*```(\w*)\s*", line):
            fence, body, start = m[1].lower(), [], n + 1
            prose.append("")
        elif line.startswith("    ") and line.strip() and (indented or n == 1 or not lines[n - 2].strip()):
            indented.append(line[4:])  # an indented code block: it follows a blank line
            prose.append("")
        else:
            prose.append(line)
    if fence is not None:
        raise ValueError(f"{doc}:{start - 1}: unclosed ```")
    if indented:
        blocks.append(Block(doc, len(lines) + 1 - len(indented), "", tuple(indented)))
    return blocks, "\n".join(prose)


def block_commands(block: Block) -> list[Command]:
    """The block's commands; a console block's lines without a `$ ` prompt are output."""
    commands, pending, first = [], "", None
    for i, line in enumerate(block.lines):
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = strip_comment(line).strip()
        if not line and not pending:
            continue
        first = block.line + i if first is None else first
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append(Command(block.doc, first, pending + line))
        pending, first = "", None
    return commands


def is_command_block(block: Block) -> bool:
    """Shell-tagged blocks always; untagged ones when their first command starts with a known program."""
    if block.lang not in SHELL_LANGS:
        return False
    commands = block_commands(block)
    return bool(block.lang) or bool(commands) and commands[0].program in PROGRAMS


def extract(docs: dict[str, str]) -> tuple[list[Command], list[Block]]:
    """Every command of the docs in order (code blocks, and commands quoted in prose), and the
    code blocks that are not commands."""
    commands, others = [], []
    for doc, text in docs.items():
        blocks, prose = code_blocks(doc, text)
        found = []
        for block in blocks:
            if is_command_block(block):
                found += block_commands(block)
            else:
                others.append(block)
        for m in re.finditer(r"`([^`]+)`", prose):
            span = " ".join(m[1].split())  # a quoted command may wrap onto the next line
            if "\n\n" not in m[1] and program_of(span) in PROGRAMS and len(span.split()) > 1:
                found.append(Command(doc, prose.count("\n", 0, m.start()) + 1, span, inline=True))
        commands += sorted(found, key=lambda c: (c.line, c.inline))
    return commands, others


COMMANDS, OTHER_BLOCKS = extract(DOCS)


def _ids(commands: list[Command]) -> list[str]:
    """README.md:10, and README.md:10+1 for a second command quoted on the same line."""
    seen: Counter = Counter()
    ids = []
    for c in commands:
        ids.append(c.id if not seen[c.id] else f"{c.id}+{seen[c.id]}")
        seen[c.id] += 1
    return ids


# code blocks that hold no command, recognised by their first line
NOT_COMMANDS = [
    (r"images on disk ──►", "architecture.md's data-flow diagram"),
    (r"f1, f2 = Enc\(x1\)", "the model's equations, as pseudo-code"),
    (r"start load ", "the output of bench/search_bench.py"),
    (r"(DATA|celeba)/|sheets layout ", "dataset folder layouts"),
    (r"file,", "an attributes.csv example"),
    (r"\d+ unreadable images in ", "an error message"),
]


# --- how each command is exercised --------------------------------------------------------------

def is_synopsis(cmd: Command) -> bool:
    """A retrieval/torchrun line with placeholders: DATA, runs/NAME, N, [optional] parts, a|b."""
    return cmd.program in ("retrieval", "torchrun") and any(
        set(w) & set("[]|") or any(PLACEHOLDER.fullmatch(p) for p in w.split("/")) for w in cmd.args)


def _text(pattern: str) -> Callable[[Command], bool]:
    return lambda cmd: re.search(pattern, cmd.text) is not None


@dataclass(frozen=True)
class Rule:
    when: Callable[[Command], bool]
    run: bool  # False: validated
    why: str


# the first rule that matches decides
RULES = [
    Rule(lambda c: c.inline, False,
         "quoted in prose, often a fragment (`retrieval evaluate --whole`): its subcommand and options must exist"),
    Rule(is_synopsis, False,
         "a synopsis: every option and a|b choice must exist, and it must parse with sample values"),
    Rule(_text(r"^make "), False,
         "builds .venv, installs Chromium, serves until Ctrl-C: the recipe must call what the docs say "
         "(tests/test_cli.py runs `retrieval demo --no-serve` itself, for 2 steps)"),
    Rule(_text(r"--preset sprites(?![\w-])"), False,
         "the sprites preset writes two 640 MB checkpoints, ~2 min for 20 steps on CPU (docs/benchmarks.md)"),
    Rule(_text(r"--preset celeba-began\b"), False,
         "128x128 BEGAN: one step and its 1.3 GB checkpoint take about a minute on CPU"),
    Rule(_text(r"^(\S+=\S+ )*retrieval ablate \.\./shared/data/sprites"), False,
         "three variants for 10 minutes each, then val indexed and evaluated three times: the same code "
         "path runs on generated data in tests/test_evaluate.py"),
    Rule(_text(r"runs/ablation-sprites/"), False,
         "reads the pending Sprites GPU ablation: its inputs are checked on the shapes ablation's "
         "output, which has the same layout (STAND_INS)"),
    Rule(_text(r"runs/abl32/seed0/"), False,
         "reads the 20-minute Sprites ablation's seed-0 run (an hour of training): its inputs are checked "
         "on the shapes ablation's output, which has the same layout (STAND_INS)"),
    Rule(_text(r"^curl "), True, "against `retrieval serve` (on a free port) over an index of shapes"),
    Rule(_text(r"^(\S+=\S+ )*(\.venv/bin/)?python bench/"), True, "the bench script at a tiny size (BUDGET)"),
    Rule(_text(r"^(\S+=\S+ )*retrieval "), True,
         "for real in the sandbox, in documented order: later lines read what earlier ones wrote"),
]

# a recipe run for 1 s, evaluated from 200 drawn queries (all 6,408 frames x 32 chunks took ~50 s each)
RECIPE_BUDGET = "--minutes 0.02 --eval-every 0.02 --eval-queries 200"
# Appended to the documented line when it runs (click and argparse take an option's last value):
# the same code path at a size that takes seconds instead of hours.
BUDGET = {
    "retrieval train ../shared/data/mnist --out runs/mnist": "--steps 2 --batch-size 4",
    "retrieval train ../shared/data/sprites --out runs/sprites": "--steps 2 --batch-size 4",
    # all 12,816 val frames stay indexed; Table 2 from 300 of them (32 chunks x N² took 8 min on CI)
    "retrieval evaluate idx/sprites --out runs/sprites/report": "--queries 300",
    "retrieval train shapes:20000 --out runs/shapes --steps 6000 --batch-size 32 --mask per-sample --lr 5e-4 "
    "--critic-lr-scale 4":
        "--steps 2 --batch-size 4",
    # the demo's whole path (generate, train, index, evaluate, name) on 200 shapes for 2 steps
    "retrieval demo --no-serve": "--steps 2 --images 200",
    "retrieval demo --no-serve --fresh": "--steps 2 --images 200",
    # the two variants that later lines read: mix (the transfer figure), mix+c+g (STAND_INS)
    "OMP_NUM_THREADS=1 retrieval ablate shapes:20000 --preset shapes --steps 1000 --batch-size 16 --seed 0 "
    "--out runs/ablation-shapes": "--steps 2 --batch-size 4 --variants mix,mix+c+g",
    ".venv/bin/python bench/search_bench.py --n 200000 1000000": "--n 2000 --repeats 1 --settle 0",
    ".venv/bin/python bench/search_bench.py --n 200000 1000000 --repeats 5": "--n 2000 --repeats 1 --settle 0",
    ".venv/bin/python bench/request_bench.py": "--n 2000 --queries 3",
    ".venv/bin/python bench/rerank_bench.py": "--n 300 --repeats 2",
    ".venv/bin/python bench/load_test.py --seconds 8": "--n 2000 --seconds 0.2",
    ".venv/bin/python bench/load_test.py --seconds 8 --threads 4": "--n 2000 --seconds 0.2",
    "python bench/load_test.py": "--n 2000 --seconds 0.2",
    ".venv/bin/python bench/train_throughput.py --repeats 5 --presets tiny,shapes,mnist,sprites,celeba-dcgan":
        "--repeats 1 --presets tiny",
    ".venv/bin/python bench/index_load.py --n 200000 --repeats 3": "--n 2000 --repeats 1",
    ".venv/bin/python bench/shard_bench.py --n 1000000 --shards 2 --queries 30": "--n 3000 --queries 2",
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name recipe-seed1 --tc '{\"seed\": 1}' --minutes 20 "
    "--eval-every 10": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name cd64 --cfg '{\"chunk_dim\": 64}' --minutes 20 "
    "--eval-every 10": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name cd8 --cfg '{\"chunk_dim\": 8}' --minutes 20 "
    "--eval-every 10": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name nc16-seed1 --cfg '{\"n_chunks\": 16}' --tc "
    "'{\"seed\": 1}' --minutes 20 --eval-every 10": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name nc32d8-perbatch-seed1 --cfg '{\"n_chunks\": 32, "
    "\"chunk_dim\": 8}' --tc '{\"mask\": \"per-batch\", \"seed\": 1}' --minutes 20 --eval-every 5":
        RECIPE_BUDGET,
    ".venv/bin/python bench/evaluate_bench.py --chunks 32": "--n 300 --repeats 1",
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name anneal30 --anneal 0.3 --minutes 20 "
    "--eval-every 10": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name r1-base-s0 --minutes 20 --eval-every 10 --ema 0.999 "
    "--eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name r3-mixg-s1 --tc '{\"variant\": \"mix+g\", \"seed\": 1}' "
    "--minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name x1-xcov10-s0 --cfg '{\"lambda_xcov\": 10}' --tc "
    "'{\"seed\": 0}' --minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name x3-feat3-s0 --cfg '{\"lambda_feat\": 3}' --tc "
    "'{\"seed\": 0}' --minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name y1-nc16-s0 --cfg '{\"n_chunks\": 16, \"chunk_dim\": 16}' "
    "--tc '{\"seed\": 0}' --minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name y2-w16x4-s0 --cfg '{\"chunk_dim\": 16, \"chunk_widths\": "
    "[16, 16, 16, 16, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]}' "
    "--tc '{\"seed\": 0}' --minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name y3-b128-s0 --tc '{\"seed\": 0, \"batch_size\": 128}' "
    "--minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name y4-beta09-s0 --tc '{\"seed\": 0, \"beta1\": 0.9}' "
    "--minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name y5-base-s0 --tc '{\"seed\": 0}' "
    "--minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name y6-lm20-s0 --cfg '{\"lambda_m\": 20}' --tc "
    "'{\"seed\": 0}' --minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name rec10 --cfg '{\"lambda_m\": 10, \"lambda_rec\": 10}' "
    "--seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name sprites-recipe --cfg '{\"lambda_m\": 10, \"lambda_rec\": 10, "
    "\"n_chunks\": 32, \"chunk_dim\": 8}' --tc '{\"mask\": \"per-batch\", \"batch_size\": 64, \"critic_lr_scale\": 1.0}' "
    "--seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name demo-wu1k --tc '{\"warmup_steps\": 1000}' "
    "--seeds 0 --steps 5000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name sb8w-rec10 --cfg '{\"decoder\": "
    "\"b8-c128-c64k3-c64k3-d32k4s2-d3k2s2\", \"lambda_m\": 10, \"lambda_rec\": 10}' --seeds 0 --steps 4000":
        "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name sb8w-one --cfg '{\"decoder\": "
    "\"b8-c128-c64k3-c64k3-d32k4s2-d3k2s2\", \"lambda_m\": 10, \"lambda_rec\": 10}' --tc '{\"mask\": \"one-chunk\"}' "
    "--seeds 0 --steps 4000":
        "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name sb8w-g8 --cfg '{\"decoder\": "
    "\"b8-c128-c64k3-c64k3-d32k4s2-d3k2s2\", \"lambda_m\": 10, \"lambda_rec\": 10}' --tc '{\"mask\": \"per-group\", "
    "\"mask_groups\": 8}' --seeds 0 --steps 4000":
        "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name sb8w-data --cfg '{\"decoder\": "
    "\"b8-c128-c64k3-c64k3-d32k4s2-d3k2s2\", \"lambda_m\": 10, \"lambda_rec\": 10, \"critic_real\": \"data\"}' "
    "--seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name hyb-data --cfg '{\"decoder\": "
    "\"b8t64-c128-c64k3-c64k3-d32k4s2-d3k2s2\", \"lambda_m\": 10, \"lambda_rec\": 10, \"critic_real\": \"data\"}' "
    "--seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name xcov10 --cfg '{\"lambda_xcov\": 10}' --seeds 0 "
    "--steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name gapmlp --cfg '{\"encoder\": "
    "\"c16k3s2-c32k3s2-xy-c64k3-c128-g-f128-f\"}' --seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name wmid --cfg '{\"decoder\": "
    "\"b8t64-c128-c64k3-c64k3-w-d32k4s2-d3k2s2\"}' --seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name wc --cfg '{\"decoder\": "
    "\"b8t64-c128-c64k3-c64k3-wc-d32k4s2-d3k2s2\"}' --seeds 0 --steps 4000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/demo_recipe.py --name wc6k --seeds 0 --steps 6000": "--steps 2 --images 200",
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name z1-g8-s0 --tc '{\"seed\": 0, \"mask\": \"per-group\", "
    "\"mask_groups\": 8}' --minutes 20 --eval-every 10 --eval-queries 2000": RECIPE_BUDGET,
    "OMP_NUM_THREADS=1 python bench/sprites_recipe.py --name e2 --preset shapes --cfg "
    "'{\"lambda_m\": 10, \"lambda_rec\": 10}' --minutes 12 --eval-every 4": RECIPE_BUDGET,
}
# validated inputs that only a GPU run or an hour's training would produce -> the same files of a run made here
STAND_INS = {"runs/ablation-sprites/": "runs/ablation-shapes/", "runs/abl32/seed0/": "runs/ablation-shapes/"}
# values for a synopsis's placeholders when it is parsed
SAMPLE = {"DATA": "shapes:50", "NAME": "x", "KEY": "shape_000005", "N": "2", "M": "4", "B": "4",
          "P": "tiny", "RUN": "runs/x", "INDEX": "idx/x"}
# what `make -n TARGET` must end by calling: the documented target's real work
MAKE_CALLS = {"demo": ["retrieval", "demo"], "test": ["python", "-m", "pytest"]}


def rule_for(cmd: Command) -> Rule | None:
    return next((r for r in RULES if r.when(cmd)), None)


RUNS_IN_SANDBOX = [c for c in COMMANDS if c.program == "retrieval" and (r := rule_for(c)) and r.run]


# --- the sandbox: a checkout beside ../shared, with its own HOME ----------------------------------

class Sandbox:
    """root/repo is the working directory, root/shared/data the real shared data, root/home HOME."""

    def __init__(self, root: Path):
        self.root, self.repo, self.home = root, root / "repo", root / "home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
        self.env.update(HOME=str(self.home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        OMP_NUM_THREADS="1", no_proxy="127.0.0.1,localhost")
        self.results: dict[Command, subprocess.CompletedProcess] = {}

    def shell(self, text: str, timeout: float = 480) -> subprocess.CompletedProcess:
        """The line as a user types it: bash, in the sandbox's checkout. The timeout only catches a
        hang: these machines differ 2.5x in speed, and a slow one took over 180 s for the
        evaluation of all 12,816 Sprites `val` frames by 16 chunks."""
        return subprocess.run(["bash", "-c", text], cwd=self.repo, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def path(self, value: str) -> Path:
        return self.home / value[2:] if value.startswith("~/") else self.repo / value

    def run(self, cmd: Command) -> subprocess.CompletedProcess:
        """cmd with its BUDGET, after every documented sandbox run before it; each runs once."""
        self.run_before(cmd)
        if cmd not in self.results:
            self.results[cmd] = self.shell(f"{cmd.text} {BUDGET.get(cmd.text, '')}")
        return self.results[cmd]

    def run_before(self, cmd: Command) -> None:
        for earlier in RUNS_IN_SANDBOX:
            if COMMANDS.index(earlier) < COMMANDS.index(cmd):
                self.run(earlier)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    if not ((SHARED / "sprites").is_dir() and (SHARED / "mnist").is_dir()):
        pytest.fail(f"no mnist/ and sprites/ in {SHARED}: set RETRIEVAL_SHARED_DATA to the shared data folder")
    if not (BIN / "retrieval").exists():
        pytest.fail(f"no {BIN / 'retrieval'}: install the project into this interpreter (make venv, or pip install -e .)")
    box = Sandbox(tmp_path_factory.mktemp("docs"))
    box.repo.mkdir()
    (box.root / "shared").mkdir()
    (box.root / "shared" / "data").symlink_to(SHARED.resolve())
    (box.repo / "bench").symlink_to(REPO / "bench")
    (box.repo / ".venv").symlink_to(BIN.parent)
    everything = "\n".join(c.text for c in COMMANDS)
    if "~/data/celeba" in everything:
        _celeba(box.home / "data" / "celeba")
    rng = np.random.default_rng(0)
    for name in sorted(set(re.findall(r"(?:=@|--file )([\w.-]+\.(?:jpg|png))", everything))):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(box.repo / name)
    yield box
    shutil.rmtree(box.root)  # the runs hold hundreds of MB of checkpoints


@pytest.fixture(scope="module")
def server(sandbox, api_index):
    """`retrieval serve` in a subprocess, port 0, over a copy of conftest's shapes index."""
    from retrieval.index import Index

    index = sandbox.root / "idx"
    shutil.copytree(api_index, index)
    Index(index).name_chunk(1, "hair colour")  # docs/api.md searches by a chunk's name
    proc = subprocess.Popen([str(BIN / "retrieval"), "serve", str(index), "--port", "0"], cwd=sandbox.repo,
                            env=sandbox.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, started = [], queue.Queue()

    def read():
        for line in proc.stderr:
            log.append(line)
            if m := re.search(r" on (http://\S+) with ", line):
                started.put(m[1])
        started.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        base = started.get(timeout=120)
    except queue.Empty:
        base = None
    if base is None:
        proc.kill()
        pytest.fail("retrieval serve did not start:\n" + "".join(log))
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


# --- validators ------------------------------------------------------------------------------------

def check_options(args: list[str]) -> click.Command:
    """The subcommand exists, every option written exists on it, and each written choice (every
    alternative of a|b) is accepted."""
    args = [a.strip("[]") for a in args]  # optional parts are written in brackets
    assert args and args[0] in main.commands, f"no subcommand {args[:1]}; there are {sorted(main.commands)}"
    cmd = main.commands[args[0]]
    options = {o: p for p in cmd.params if isinstance(p, click.Option) for o in [*p.opts, *p.secondary_opts]}
    i = 1
    while i < len(args):
        word, i = args[i], i + 1
        if not word.startswith("-"):
            continue
        name, eq, value = word.partition("=")
        assert name in options, f"`retrieval {args[0]}` has no option {name}; it has {sorted(options)}"
        option = options[name]
        values = [value] if eq else [] if option.is_flag else args[i:i + option.nargs]
        i += 0 if eq or option.is_flag else option.nargs
        if isinstance(option.type, click.Choice):
            for alternative in (a for v in values for a in v.split("|")):
                assert PLACEHOLDER.fullmatch(alternative) or alternative in option.type.choices, \
                    f"{name} {alternative}: not one of {option.type.choices}"
    return cmd


def _sample(word: str) -> str:
    parts = word.split("/")
    missing = [p for p in parts if PLACEHOLDER.fullmatch(p) and p not in SAMPLE]
    assert not missing, f"placeholder {missing}: add a sample value to SAMPLE"
    return "/".join(SAMPLE.get(p, p) for p in parts)


def parse(args: list[str]) -> list[click.Context]:
    """Parse with the subcommand's own click parser: optional parts included, placeholders given
    SAMPLE values, each alternative of a|b in turn."""
    words = [a.strip("[]") for a in args]
    width = max(len(w.split("|")) for w in words)
    contexts = []
    for j in range(width):
        concrete = [_sample(w.split("|")[min(j, w.count("|"))]) for w in words]
        try:
            contexts.append(main.commands[concrete[0]].make_context(concrete[0], concrete[1:]))
        except click.ClickException as e:
            pytest.fail(f"retrieval {shlex.join(concrete)}: {e.format_message()}")
    return contexts


def check_inputs(cmd: Command, ctx: click.Context, sandbox: Sandbox) -> None:
    """The data folder exists and is detected as the format it is named after (and its preset
    exists); checkpoints and indexes read exist (their STAND_INS after the runs before cmd)."""
    from disentangle.config import preset
    from disentangle.data import detect_format

    data = ctx.params.get("data")
    if data and data.split(":")[0] != "shapes":
        path = sandbox.path(data)
        assert path.is_dir(), f"{data}: no such folder ({path})"
        fmt = ctx.params.get("fmt") or detect_format(path)
        assert path.name not in DEFAULT_PRESET or fmt == path.name, f"{data} is detected as {fmt}"
        if "preset" in ctx.params:
            preset(ctx.params["preset"] or DEFAULT_PRESET[fmt])
    if is_synopsis(cmd):
        return
    for key in ("model_path", "checkpoint_path", "index_path"):
        if value := ctx.params.get(key):
            for real, stand_in in STAND_INS.items():
                value = value.replace(real, stand_in)
            sandbox.run_before(cmd)
            assert sandbox.path(value).exists(), f"{ctx.params[key]}: nothing at {value} after the runs above"


def check_make(cmd: Command) -> None:
    """`make -n` (prints, runs nothing) must end in the call the docs promise."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed: apt-get install make")
    # under `make test` the parent's MAKEFLAGS/MAKELEVEL make the child print "Entering directory"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", *cmd.args], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    expected = MAKE_CALLS.get(cmd.args[0])
    assert expected, f"`make {cmd.args[0]}`: add to MAKE_CALLS what its recipe must end by calling"
    call = shlex.split(dry.stdout.strip().splitlines()[-1])
    assert [Path(call[0]).name, *call[1:len(expected)]] == expected, f"`{cmd.text}` ends in {call}"
    if expected[0] == "retrieval":
        check_options(call[1:])
        parse(call[1:])


def check_torchrun(cmd: Command) -> None:
    """torchrun's own parser accepts the line, and what it starts is `python -m retrieval ...`."""
    from torch.distributed.run import get_args_parser

    assert (BIN / "torchrun").exists(), f"no {BIN / 'torchrun'}: torch's scripts are not installed"
    try:
        ns = get_args_parser().parse_args(cmd.args)
    except SystemExit:
        pytest.fail(f"torchrun rejects `{cmd.text}`")
    assert ns.module and ns.training_script == "retrieval", "torchrun must start `-m retrieval`"
    assert importlib.util.find_spec("retrieval.__main__"), "`python -m retrieval` needs retrieval/__main__.py"
    check_options(ns.training_script_args)


def validate(cmd: Command, sandbox: Sandbox) -> None:
    if cmd.program == "retrieval":
        check_options(cmd.args)
        if not cmd.inline:
            for ctx in parse(cmd.args):
                check_inputs(cmd, ctx, sandbox)
    elif cmd.program == "make":
        check_make(cmd)
    elif cmd.program == "torchrun":
        check_torchrun(cmd)
    else:
        pytest.fail(f"no validator for {cmd.program}: write one, or a RULE that runs the line")


# --- runners -----------------------------------------------------------------------------------------

def _done(cmd: Command, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"`{cmd.text}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"


def _check_output(path: Path) -> None:
    assert path.exists(), f"{path} was not written"
    if path.suffix == ".png":
        Image.open(path).verify()


def run_retrieval(cmd: Command, sandbox: Sandbox) -> None:
    result = sandbox.run(cmd)
    _done(cmd, result)
    args = shlex.split(f"{shlex.join(cmd.args)} {BUDGET.get(cmd.text, '')}")
    out = main.commands[args[0]].make_context(args[0], args[1:]).params.get("out")
    if out:
        _check_output(sandbox.path(out))


def run_curl(cmd: Command, sandbox: Sandbox, base: str) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: apt-get install curl")
    assert DOC_BASE in cmd.text, f"the curl examples address {DOC_BASE}; this one does not, so it is not rewritten"
    result = sandbox.shell(cmd.text.replace(DOC_BASE, base) + " -sS -w '\\n%{http_code}'", timeout=60)
    _done(cmd, result)
    status = result.stdout.rsplit("\n", 1)[-1]
    assert status.startswith("2"), f"`{cmd.text}` answered HTTP {status}: {result.stdout}"
    if "-o" in cmd.args:
        _check_output(sandbox.path(cmd.args[cmd.args.index("-o") + 1]))


# --- tests --------------------------------------------------------------------------------------------

def test_extractor_reads_blocks_continuations_comments_and_prose():
    text = textwrap.dedent("""\
        Start with `retrieval serve INDEX`; the `make` tool and `--steps 4` are no commands.

        ```
        retrieval train shapes --out 'runs/a # b'   # a comment
        retrieval index shapes \\
            --model m.pt --out idx
        ```

        ```json
        {"a": 1}
        ```

            python bench/x.py --n 3

        ```console
        $ curl http://host/#top
        {"output": 1}
        ```

        ```
        DATA/img_align_celeba/
        ```
        """)
    commands, others = extract({"x.md": text})
    assert [(c.line, c.text, c.inline) for c in commands] == [
        (1, "retrieval serve INDEX", True),
        (4, "retrieval train shapes --out 'runs/a # b'", False),
        (5, "retrieval index shapes --model m.pt --out idx", False),
        (13, "python bench/x.py --n 3", False),
        (16, "curl http://host/#top", False)]
    assert [(b.lang, b.lines) for b in others] == [("json", ('{"a": 1}',)), ("", ("DATA/img_align_celeba/",))]


def test_docs_hold_the_commands_we_expect():
    blocks = Counter(c.program for c in COMMANDS if not c.inline)
    assert blocks["retrieval"] >= 20 and blocks["curl"] >= 6 and blocks["make"] >= 2, blocks
    assert blocks["python"] + blocks[".venv/bin/python"] >= 4, blocks
    assert sum(c.inline for c in COMMANDS) >= 8
    assert {c.doc for c in COMMANDS} >= {"README.md", "docs/api.md", "docs/benchmarks.md", "docs/results.md"}


def test_every_command_block_starts_with_a_known_program():
    unknown = [f"{c.id}: {c.text}" for c in COMMANDS if c.program not in PROGRAMS]
    assert not unknown, "a new kind of command: add its program to PROGRAMS and a RULE for it\n" + "\n".join(unknown)


def test_every_other_code_block_is_known_not_to_be_commands():
    unknown = [f"{b.doc}:{b.line}: {b.lines[:1]}" for b in OTHER_BLOCKS
               if b.lang in SHELL_LANGS and not any(re.match(p, b.lines[0]) for p, _ in NOT_COMMANDS if b.lines)]
    assert not unknown, ("code blocks neither commands nor known output: tag them ```text, or add them to "
                         "NOT_COMMANDS or PROGRAMS\n" + "\n".join(unknown))


def test_every_command_has_a_rule_and_runs_have_a_budget():
    assert not [c.id for c in COMMANDS if rule_for(c) is None]
    runs = {c.text for c in COMMANDS if rule_for(c).run}
    assert set(BUDGET) <= runs, f"BUDGET names lines no doc runs any more: {set(BUDGET) - runs}"
    slow = [c.id for c in COMMANDS if rule_for(c).run and c.text not in BUDGET
            and (c.program not in ("retrieval", "curl") or c.args[0] in ("train", "ablate", "demo"))]
    assert not slow, f"these would train or benchmark at full size: give them a BUDGET: {slow}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command(cmd, sandbox, request):
    rule = rule_for(cmd)
    assert rule is not None, f"no RULE says how to exercise `{cmd.text}`"
    print(f"{'run' if rule.run else 'validated'}: {rule.why}")  # shown with a failure
    if not rule.run:
        validate(cmd, sandbox)
    elif cmd.program == "curl":
        run_curl(cmd, sandbox, request.getfixturevalue("server"))
    elif cmd.program == "retrieval":
        run_retrieval(cmd, sandbox)
    else:
        _done(cmd, sandbox.shell(f"{cmd.text} {BUDGET[cmd.text]}"))
