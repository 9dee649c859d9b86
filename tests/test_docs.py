"""The command blocks of README.md and docs/*.md that are marked CPU-runnable run as written.

A block is marked by an HTML comment (invisible on GitHub) on the line right before its fence::

    <!-- cpu-test -->
    <!-- cpu-test: /models/Qwen3-8B=>{hf_general} run.steps=120=>run.steps=2 -->

Each ``FROM=>TO`` (shell-quoted when it holds spaces) replaces the text FROM in the block: the docs
speak of the reader's paths and sizes, the test substitutes its own. ``{name}`` in TO is a fixture of
this test: ``{hf_general}`` and ``{hf_domain}`` are tiny Qwen2 Hugging Face models with their
tokenizer. The marked blocks of one file run in order (``bash -euo pipefail``) in one scratch
directory that links the repository's ``examples/`` and ``tools/``, so a block can use what an earlier
one wrote; PATH starts with this interpreter's directory (``python``, ``camopd-train``, ``camopd-convert-*``).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"^<!--\s*cpu-test(?::\s*(?P<subs>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    """1-based line of the opening fence."""
    text: str
    subs: tuple[tuple[str, str], ...]

    def script(self, fixtures: dict[str, str]) -> str:
        text = self.text
        for old, new in self.subs:
            assert old in text, f"{self.doc}:{self.line}: cpu-test substitution {old!r} is not in the block"
            text = text.replace(old, new.format(**fixtures))
        return text


def marked_blocks(path: Path) -> list[Block]:
    """The blocks of ``path`` marked ``<!-- cpu-test -->``, in order (a marker without a fence is an error)."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m is None:
            continue
        where = f"{path.relative_to(ROOT)}:{i + 1}"
        assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), f"{where}: cpu-test marker not followed by a fence"
        assert FENCE.match(lines[i + 1]).group(1) in ("bash", "sh", ""), f"{where}: cpu-test on a non-shell block"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{where}: unclosed fence"
        subs = tuple(tuple(s.split("=>", 1)) for s in shlex.split(m.group("subs") or ""))
        assert all(len(s) == 2 for s in subs), f"{where}: substitutions are FROM=>TO"
        blocks.append(Block(str(path.relative_to(ROOT)), i + 2, "\n".join(lines[i + 2:end]), subs))  # type: ignore[arg-type]
    return blocks


MARKED = {str(p.relative_to(ROOT)): marked_blocks(p) for p in DOCS}


def test_marked_blocks_exist():
    """The markers stay: README's conversions, the dry run and the guide's convert/export steps."""
    counts = {doc: len(blocks) for doc, blocks in MARKED.items() if blocks}
    assert counts.get("README.md", 0) >= 1 and sum(counts.values()) >= 4, counts


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("transformers")
    from tests.hf_conversion_workers import save_tiny_qwen2

    root = tmp_path_factory.mktemp("doc_models")
    out = {}
    for seed, name in enumerate(("hf_general", "hf_domain")):
        save_tiny_qwen2(root / name, seed)
        out[name] = str(root / name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("doc", [doc for doc, blocks in MARKED.items() if blocks])
def test_marked_blocks_run(doc, fixtures, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("examples", "tools"):
        (work / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH")))))
    for block in MARKED[doc]:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.script(fixtures)], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{block.doc}:{block.line} failed ({r.returncode}):\n{block.text}\n{r.stderr[-3000:]}"
