"""What a scientific package ships: licence, citation file, and no machine-specific paths."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

import fastivim

ROOT = Path(__file__).resolve().parents[1]

#: Folders that are not the project's own text (virtualenvs, caches, build output).
SKIP_DIRS = {".git", ".venv", ".hypothesis", ".pytest_cache", "__pycache__", "build", "dist",
             "out", ".ruff_cache"}

#: Absolute paths that only exist on one machine.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|Users|root)/[\w.-]+")


def test_licence_matches_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "the fastivim developers" in text


def test_citation_file():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    assert cff["version"] == fastivim.__version__
    dois = [r.get("doi") for r in cff["references"]]
    assert "10.1148/radiology.168.2.3393671" in dois  # the IVIM model (Le Bihan 1988)


def _project_text_files():
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.startswith(".venv") or part.endswith(".egg-info")
               for part in rel.parts) or not p.is_file():
            continue
        if p.suffix in (".py", ".md", ".cfg", ".toml", ".txt", ".cff", ".yaml", ".yml", "") \
                or p.name == "Makefile":
            yield p


def test_no_machine_specific_paths():
    hits = []
    for p in _project_text_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    assert not hits, hits
