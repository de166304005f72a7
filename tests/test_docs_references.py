"""What the docs point a reader at exists as they say: every module of the package is on the architecture page's
module map and every module the map names is there, and the example files and snippets the docs offer to copy load
with the package's own loaders."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from felix.cli import VERBS
from felix.harvest_config import HarvestConfig, SynthConfig, load_harvest_config
from felix.splice_edit import load_requests

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "felix"
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def named_on_the_page() -> set[str]:
    """The `x.py` files the architecture page names, as written (`tasks/` rows name their modules bare)."""
    return set(re.findall(r"`(?:[a-z_]+/)?([a-z_]+\.py)`", ARCHITECTURE))


def test_every_module_is_on_the_architecture_page():
    named = named_on_the_page()
    missing = [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.glob("*.py")) + sorted(PACKAGE.glob("tasks/*.py"))
               if p.name != "__init__.py" and p.name not in named]
    # commands/<verb>.py is one row; a module there that is no verb must be named
    missing += [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.glob("commands/*.py"))
                if p.stem not in VERBS and p.name != "__init__.py" and f"commands/{p.name}" not in ARCHITECTURE]
    assert not missing, f"docs/architecture.md's module map leaves out {missing}"


def test_every_module_the_page_names_exists():
    here = {p.name for d in ("", "tasks", "commands") for p in (PACKAGE / d).glob("*.py")}
    assert not sorted(named_on_the_page() - here)


def test_the_harvest_example_validates():
    cfg = load_harvest_config(ROOT / "docs" / "harvest-example.yaml")
    assert {t.provider for t in cfg.teachers} == {"openai", "anthropic", "gemini"}
    assert cfg.synth.heldout is not None and cfg.items


def test_the_harvest_pages_yaml_snippets_validate():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "harvest.md").read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        doc = yaml.safe_load(block)
        assert set(doc) <= set(HarvestConfig.model_fields)
        SynthConfig.model_validate(doc["synth"])


def test_the_splicing_pages_edit_request_loads(tmp_path):
    block = re.search(r"```json\n(.*?)```", (ROOT / "docs" / "splicing.md").read_text(encoding="utf-8"), re.S)
    path = tmp_path / "edits.jsonl"
    path.write_text(block.group(1), encoding="utf-8")
    (req,) = load_requests(path)
    assert req.prompt and req.target and req.paraphrases and req.neutral and req.id == "e001"

