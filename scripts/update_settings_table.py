"""Rewrite the flag table of docs/dispatcher.md from megatron_microep/settings.py (run after changing a setting).

python scripts/update_settings_table.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from megatron_microep.settings import settings_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "dispatcher.md"
BLOCK = re.compile(r"(<!-- settings-table:[^\n]*-->\n)(.*?)(<!-- /settings-table -->)", re.S)


def updated(text: str) -> str:
    if not BLOCK.search(text):
        raise SystemExit(f"{DOC}: no settings-table markers")
    return BLOCK.sub(lambda m: m.group(1) + settings_table() + m.group(3), text)


if __name__ == "__main__":
    DOC.write_text(updated(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    sys.exit(0)
