"""A run's training curves from its metrics.jsonl (gear.run.read_metrics), grouped into the panels the page plots.

Each panel is long-format rows (step, value, metric): one line per metric. The file is read afresh each time,
so a run still training shows its newest steps; a line still being written is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


def _is_loss(key: str) -> bool:
    return key.endswith("loss") or key in ("tok/l1", "tok/perceptual", "ar/ntp")


# (title, which metric keys it plots); a key may appear in several panels
PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("Losses", _is_loss),
    ("Codebook usage", lambda k: k.startswith("codebook/usage")),
    ("Codebook perplexity", lambda k: k == "codebook/perplexity"),
    ("Alignment", lambda k: "align" in k),
    ("FID", lambda k: k.startswith("eval/") and "fid" in k),
)
PANEL_TITLES = tuple(title for title, _ in PANELS)


@dataclass
class Panel:
    title: str
    rows: list[dict] = field(default_factory=list)  # {"step": int, "value": float, "metric": str}

    @property
    def metrics(self) -> list[str]:
        return sorted({r["metric"] for r in self.rows})


def curve_panels(records: list[dict]) -> list[Panel]:
    """One Panel per entry of PANELS, in that order (empty rows where the run logged none of its metrics)."""
    panels = [Panel(title) for title in PANEL_TITLES]
    for record in records:
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            for panel, (_, wanted) in zip(panels, PANELS):
                if wanted(key):
                    panel.rows.append({"step": record["step"], "value": float(value), "metric": key})
    return panels
