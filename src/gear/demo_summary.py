"""Write the short summary of a `make demo` run: losses and codebook usage of each stage, and the artefacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("tokenizer", "joint", "ar")
SHOWN = ("tok/l1", "tok/align_tok", "disc/loss", "ar/ntp", "ar/align_cos", "codebook/usage_window", "codebook/perplexity")


def summarize(demo_dir: Path) -> str:
    lines = [f"# GEAR demo summary ({demo_dir})", "", "| stage | steps | seconds | " + " | ".join(SHOWN) + " |",
             "|---" * (3 + len(SHOWN)) + "|"]
    for stage in STAGES:
        path = demo_dir / stage / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        cells = [f"{s[k]:.4g}" if k in s else "-" for k in SHOWN]
        lines.append(f"| {stage} | {s['step']} | {s['seconds']} | " + " | ".join(cells) + " |")
    lines += ["", "Artefacts:"]
    for name in ("samples.png", "ar/samples", "joint/recon", "tokenizer/recon"):
        if (demo_dir / name).exists():
            lines.append(f"- {demo_dir / name}")
    return "\n".join(lines) + "\n"


def main() -> None:
    demo_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    text = summarize(demo_dir)
    (demo_dir / "SUMMARY.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
