"""What one study hands back: headline numbers, tables, figures, and notes on what it could not compute."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class StudyOutput:
    summary: dict = field(default_factory=dict)  # source -> {name: number or None}
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # file stem -> table
    figures: list[dict] = field(default_factory=list)  # {"file", "title", "caption"} in display order
    notes: list[str] = field(default_factory=list)

    def attempt(self, what: str, compute):
        """compute() or, when its number is undefined on these data (ValueError), None and a note saying why."""
        try:
            return compute()
        except ValueError as error:
            self.notes.append(f"{what}: not computed ({error})")
            return None
