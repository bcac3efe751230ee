"""Every fenced code block of README.md and docs/**/*.md runs, so the documentation cannot drift.

Blocks run as written, with the tools' embedded defaults (tiny presets, built-in calibration
data, no download): shell blocks command by command through `modadapt.cli.main` (optional
``[...]`` arguments of a synopsis are left out), Python blocks with `exec`, TOML blocks parse.
Each runs in a fresh directory, so relative paths (``report/``, ``llama-mod/``) stay there.

What a block assumes but does not show (its input tensors, a local model for
``"path/to/llama"``, a text file) is given below, per block, next to the block's key; a block that
cannot run here (it installs packages, needs a GPU, a dataset or a pretrained download, or is a
synopsis of placeholders) is listed in `SKIP` / `GPU` with the reason. A block is keyed by its
file and a piece of text only it contains; every key must match exactly one block, and a block
nobody listed must run as it is.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import SAMPLE_TEXT

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: Blocks that cannot run here, and why.
SKIP = {
    ("README.md", "python -m pytest"): "runs this test suite in a new virtual environment (PyPI installs, minutes)",
    ("docs/arank.md", "-c REPORT/convert.yaml"): "synopsis: MODEL, REPORT and OUT are placeholders "
    "(the same commands run in README.md's quick start)",
    ("docs/recipes.md", "modadapt convert MODEL --router NAME"): "synopsis of every command: MODEL, NAME, DIR, ... "
    "are placeholders",
    ("docs/recipes.md", "--model path/to/llama --router threshold-p"): "needs a pretrained model and corpus files "
    "(path/to/llama, train.txt.gz); tests/test_lm_adapt.py runs the recipe",
    ("docs/recipes.md", "--data /data/imagenet"): "needs ImageNet and downloads pretrained weights "
    "(tests/test_vit_recipe.py runs the recipe)",
    ("docs/recipes.md", "--data train.json --eval-data test.json"): "needs LLaVA-format data "
    "(tests/test_llava.py runs the recipe)",
    ("docs/recipes.md", "accelerate launch --multi_gpu --num_processes N"): "launches several processes, N of them "
    "on GPUs; tests/test_processes.py runs "
    "these launches on 2 CPU processes",
}
#: Blocks that need CUDA: the reason, and the names they assume.
GPU = {
    ("docs/decoding.md", "modadapt.GraphedDecoder(model.eval())"): (
        "GraphedDecoder captures CUDA graphs (tests/test_graphed_decode.py runs its eager path on CPU)",
        "import modadapt, torch\n"
        "model = modadapt.convert(modadapt.build_preset('tiny-llama').cuda(), router='topk', capacity=0.5)\n"
        "input_ids = torch.randint(3, 256, (2, 8), device='cuda'); mask = torch.ones_like(input_ids)\n",
    ),
    ("docs/decoding.md", "speculate=4)       # K = 4"): (
        "GraphedDecoder captures CUDA graphs (tests/test_speculative_decode.py runs its eager path on CPU)",
        "import modadapt, torch\n"
        "model = modadapt.convert(modadapt.build_preset('tiny-llama').cuda(), router='topk', capacity=0.5)\n"
        "input_ids = torch.randint(3, 256, (2, 8), device='cuda'); mask = torch.ones_like(input_ids)\n",
    ),
}
#: Shell blocks whose other commands set up a machine (venv, pip): only their `modadapt` commands run.
ONLY_MODADAPT = {("README.md", "modadapt demo"): "the virtual environment and PyPI installs are left out"}
#: What a block assumes: Python run before it (in its namespace), files in its directory, and text
#: replaced in it (a local model for a hub path).
PRELUDE = {
    ("docs/routers.md", 'from_pretrained("path/to/llama")'): (
        "import modadapt, torch\n"
        "modadapt.build_preset('tiny-llama').save_pretrained('dense-llama')\n"
        "input_ids = torch.randint(3, 256, (2, 12)); mask = torch.ones_like(input_ids)\n"
    ),
    ("docs/decoding.md", "assistant_model=draft.eval()"): (
        "import copy, modadapt, torch\n"
        "model = modadapt.build_preset('tiny-llama').eval()\n"
        "input_ids = torch.randint(3, 256, (1, 8))\n"
    ),
    ("docs/recipes.md", "modadapt.peft_config(model, r=8)"): (
        "import modadapt, peft\n"
        "model = modadapt.convert(modadapt.build_preset('tiny-llama'), router='topk', capacity=0.5)\n"
    ),
    ("docs/recipes.md", 'create_model("deit3_small_patch16_224")'): (
        "import modadapt, torch\nimages = torch.randn(1, 3, 224, 224)\n"
    ),
    ("docs/recipes.md", 'build_preset("tiny-llava")'): (
        "import modadapt, torch\n"
        "px = torch.randn(1, 3, 32, 32)\n"
        "ids = torch.tensor([[1] + [3] * 16 + list(b'USER: what is it? ASSISTANT:') + list(b' a cat') + [2]])\n"
        "mask = torch.ones_like(ids); labels = ids.clone(); labels[:, :45] = -100\n"
    ),
}
DATA = {
    ("README.md", "--data notes.txt"): {"notes.txt": SAMPLE_TEXT},
    ("docs/recipes.md", "modadapt prune tiny-llama"): {"notes.txt": SAMPLE_TEXT},
}
REPLACE = {("docs/routers.md", 'from_pretrained("path/to/llama")'): {'"path/to/llama"': '"dense-llama"'}}


@dataclass
class Block:
    file: str
    line: int
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for path in FILES:
        text = path.read_text()
        for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
            indent = len(match.group(1))
            code = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
            line = text.count("\n", 0, match.start()) + 1
            out.append(Block(str(path.relative_to(ROOT)), line, match.group(2), code))
    return out


BLOCKS = blocks()


def key_of(block: Block):
    """The key (file, text) that lists `block` in one of the tables, or None."""
    keys = [
        k
        for table in (SKIP, GPU, ONLY_MODADAPT, PRELUDE, DATA, REPLACE)
        for k in table
        if k[0] == block.file and k[1] in block.code
    ]
    assert len(set(keys)) <= 1, f"{block.id} matches several keys: {sorted(set(keys))}"
    return keys[0] if keys else None


def test_every_listed_block_exists_once():
    for table in (SKIP, GPU, ONLY_MODADAPT, PRELUDE, DATA, REPLACE):
        for file, text in table:
            found = [b.id for b in BLOCKS if b.file == file and text in b.code]
            assert len(found) == 1, f"{file}: {text!r} matches blocks {found}; update the table"
    assert {b.lang for b in BLOCKS} <= {"bash", "python", "toml"}, "a block in a language this test cannot run"


def shell_commands(block: Block) -> list[list[str]]:
    """The `modadapt` commands of a shell block, arguments split, optional [...] groups left out."""
    text = re.sub(r"\\\n", " ", block.code)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\s*\[[^\]]*\]", "", line)
        tokens = shlex.split(line, comments=True)
        while tokens:
            command, tokens = (
                (tokens[: tokens.index("&&")], tokens[tokens.index("&&") + 1 :]) if "&&" in tokens else (tokens, [])
            )
            if command and command[0] == "modadapt":
                placeholders = [t for t in command if re.fullmatch(r"[A-Z][A-Z_]{2,}(\.\w+)?/?", t)]
                assert not placeholders, f"{block.id}: placeholders {placeholders}; list the block in SKIP"
                commands.append(command[1:])
            elif command:
                assert key_of(block) in ONLY_MODADAPT, f"{block.id}: `{' '.join(command)}` is not a modadapt command"
    return commands


@pytest.fixture
def block_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_runs(block, block_dir, capsys):
    from modadapt.cli import main

    key = key_of(block)
    if key in SKIP:
        pytest.skip(f"{block.id}: {SKIP[key]}")
    prelude = PRELUDE.get(key, "")
    if key in GPU:
        if not torch.cuda.is_available():
            pytest.skip(f"{block.id}: needs CUDA: {GPU[key][0]}")
        prelude = GPU[key][1]
    for name, content in DATA.get(key, {}).items():
        (block_dir / name).write_text(content)
    code = block.code
    for old, new in REPLACE.get(key, {}).items():
        code = code.replace(old, new)
    if block.lang == "toml":
        tomllib.loads(code)
    elif block.lang == "bash":
        commands = shell_commands(block)
        assert commands, f"{block.id}: no modadapt command to run"
        for argv in commands:
            assert main(argv) == 0, f"{block.id}: `modadapt {' '.join(argv)}` failed: {capsys.readouterr().err[-2000:]}"
    else:
        module = types.ModuleType(f"docs_block_{block.line}")
        sys.modules[module.__name__] = module  # dataclasses and pickling look classes up by module
        try:
            exec(compile(prelude, f"<prelude of {block.id}>", "exec"), module.__dict__)
            exec(compile(code, block.id, "exec"), module.__dict__)
        finally:
            del sys.modules[module.__name__]
