"""Bundled run presets: TOML files holding only what they change from the defaults.

    cfg = load_config(preset_path("smollm2-lora"), overrides=['data.workspace="WS"'])
    sets = preset_sets("smollm2-lora")      # the same as `section.key=value` overrides

`smollm2-lora` fine-tunes SmolLM2-135M-Instruct with LoRA adapters and int8 updates; it is the
configuration `fedlm demo --assistant` (fedlm.assistant) trains with.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fedlm.errors import UserError

PRESETS = Path(__file__).parent


def preset_path(name: str) -> Path:
    """The bundled preset `name` (e.g. "smollm2-lora"); UserError listing them if unknown."""
    path = PRESETS / f"{name.removesuffix('.toml')}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise UserError(f"no preset {name!r}; bundled presets: {known}")
    return path


def preset_sets(name: str) -> list[str]:
    """The preset as `section.key=value` overrides (JSON values are TOML literals), to combine
    with others in `load_config(None, sets)`."""
    data = tomllib.loads(preset_path(name).read_text(encoding="utf-8"))
    return [f"{section}.{key}={json.dumps(value)}" for section, table in data.items() for key, value in table.items()]
