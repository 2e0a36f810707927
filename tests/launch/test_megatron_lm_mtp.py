"""scripts/pretrain_gpt_microep.py with ``--mtp-num-layers 1`` against each Megatron-LM checkout of
conftest.py (the ../shared/megatron-lm snapshots, or MEGATRON_LM_PATH).

From core_r0.19 the checkout's own model builder must give the MTP block a MicroEP layer (the tiny
preset: 4 decoder MoE layers + 1 MTP layer, on 4 CPU ranks); before it the script refuses MTP with
exit code 2 and the reason (Megatron-LM's ``gpt_builders.py`` reads ``use_te`` unassigned whenever
``--spec`` is given).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHECKOUTS, megatron_lm_env
from test_megatron_lm_entry import SCRIPT, _flags, _run, _torchrun


def _checkout_version(checkout: Path) -> tuple[int, int]:
    text = (checkout / "megatron" / "core" / "package_info.py").read_text()
    return tuple(int(re.search(rf"^{name}\s*=\s*(\d+)", text, re.M).group(1)) for name in ("MAJOR", "MINOR"))


@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_mtp_layers_are_microep_or_refused_before_core_r0_19(megatron_lm, checkout):
    root = megatron_lm(checkout)
    flags = [*_flags("tiny-cpu"), "--mtp-num-layers", "1"]
    if _checkout_version(root) < (0, 19):
        env = megatron_lm_env(root, WORLD_SIZE="4", RANK="0")
        cmd = [sys.executable, str(SCRIPT), "--microep-check", "args", *flags]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "--mtp-num-layers needs Megatron-LM core_r0.19 or later" in result.stderr
        return
    result = _run(_torchrun(str(SCRIPT), "--microep-check", "model", *flags), megatron_lm_env(root))
    assert result.stdout.count("with 5 MicroEP / 5 MoE layers") == 4
