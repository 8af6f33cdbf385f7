"""One training stage of a demo (`make demo`, `make demo-t2i`): train it, continue it, or leave it when finished.

    python scripts/demo_stage.py CONFIG RUN_DIR [KEY=VALUE ...]

A run directory that holds a checkpoint (an interrupted make) is continued with `gear resume`, which returns at
once when the stage had finished; otherwise the stage is trained from CONFIG. A stage that stops early (Ctrl-C,
SIGTERM: it checkpoints and exits 0) ends the make with status 1, so the next stage never starts from a half-trained
model; running make again continues it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gear.cli import main as gear
from gear.config import load_config
from gear.train import checkpoint


def run_stage(config: str, run_dir: Path, overrides: list[str]) -> int:
    if checkpoint.has_checkpoint(run_dir):
        status = gear(["resume", str(run_dir)])
    else:
        status = gear(["train", config, f"train.out_dir={run_dir}", *overrides])
    if status != 0:
        return status
    steps = load_config(run_dir / "config.yaml").train.steps
    summary = run_dir / "summary.json"
    done = json.loads(summary.read_text())["step"] if summary.is_file() else 0
    if done < steps:
        print(f"{run_dir} stopped at step {done} of {steps}; run make again to continue it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    sys.exit(run_stage(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
