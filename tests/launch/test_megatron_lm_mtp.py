"""scripts/pretrain_gpt_microep.py with ``--mtp-num-layers 1`` against the Megatron-LM checkout in MEGATRON_LM_PATH.

From core_r0.19 the checkout's own model builder must give the MTP block a MicroEP layer (the tiny
preset: 4 decoder MoE layers + 1 MTP layer, on 4 CPU ranks); before it the script refuses MTP with
exit code 2 and the reason (Megatron-LM's ``gpt_builders.py`` reads ``use_te`` unassigned whenever
``--spec`` is given).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from test_megatron_lm_entry import CHECKOUT, SCRIPT, _flags, needs_checkout


def _checkout_version() -> tuple[int, int]:
    text = (Path(CHECKOUT) / "megatron" / "core" / "package_info.py").read_text()
    return tuple(int(re.search(rf"^{name}\s*=\s*(\d+)", text, re.M).group(1)) for name in ("MAJOR", "MINOR"))


@needs_checkout
def test_mtp_layers_are_microep_or_refused_before_core_r0_19():
    flags = [*_flags("tiny-cpu"), "--mtp-num-layers", "1"]
    if _checkout_version() < (0, 19):
        env = {**os.environ, "WORLD_SIZE": "4", "RANK": "0"}
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--microep-check", "args", *flags],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "--mtp-num-layers needs Megatron-LM core_r0.19 or later" in result.stderr
        return
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-port",
            "29587",
            str(SCRIPT),
            "--microep-check",
            "model",
            *flags,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("with 5 MicroEP / 5 MoE layers") == 4
