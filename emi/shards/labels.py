"""The labels CSV: a `Filename` column naming the clip, then label columns whose kinds come from the data.

A column is "float" when every non-empty value in the whole CSV parses as a float, else "str"; the six EMI
intensities are always "float" (so a non-numeric value there is a bad row, not a string column). Per row, a
float label that is empty, not a number, NaN or infinite makes the row fail, and so does an EMI intensity
outside [0, 1].
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from emi import EMI_EMOTIONS
from emi.errors import UsageError

FILENAME_COLUMN = "Filename"


@dataclass(frozen=True)
class LabelRow:
    line: int  # line in the CSV where the row starts, for messages
    filename: str  # the Filename cell as written, spaces included
    values: dict[str, str]  # label column -> raw text


@dataclass(frozen=True)
class LabelTable:
    path: Path
    kinds: dict[str, str]  # label column -> "float" | "str", in CSV order
    rows: list[LabelRow]


def read_csv_rows(path: str | Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line, row) pairs of a CSV; UsageError when it is missing, unreadable or malformed.

    Cells are stripped of surrounding spaces, except the Filename cell: a file name may begin or end with one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: CSV file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            rows = []
            line = reader.line_num + 1
            for fields in reader:
                if fields:  # blank lines carry nothing
                    if len(fields) != len(header):
                        raise UsageError(f"{path}: line {line} has {len(fields)} fields, the header has {len(header)}")
                    rows.append(
                        (
                            line,
                            {
                                name: field if name == FILENAME_COLUMN else field.strip()
                                for name, field in zip(header, fields, strict=True)
                            },
                        )
                    )
                line = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{path}: unreadable CSV ({err})") from None
    if not header:
        raise UsageError(f"{path}: empty CSV, expected a header with {', '.join(required)}")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise UsageError(f"{path}: duplicate column names {duplicated}")
    missing = [name for name in required if name not in header]
    if missing:
        raise UsageError(f"{path}: no {' or '.join(repr(m) for m in missing)} column (columns: {', '.join(header)})")
    seen: dict[str, int] = {}
    for line, row in rows:
        name = row[FILENAME_COLUMN].strip()
        if name and name in seen:
            raise UsageError(f"{path}: duplicate {FILENAME_COLUMN} {name!r} on lines {seen[name]} and {line}")
        seen[name] = line
    return header, rows


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def column_kinds(header: list[str], rows: list[tuple[int, dict[str, str]]]) -> dict[str, str]:
    kinds = {}
    for name in header:
        if name == FILENAME_COLUMN:
            continue
        values = [row[name] for _, row in rows if row[name]]
        numeric = name in EMI_EMOTIONS or (values and all(_is_float(value) for value in values))
        kinds[name] = "float" if numeric else "str"
    return kinds


def read_labels(path: str | Path) -> LabelTable:
    header, rows = read_csv_rows(path, (FILENAME_COLUMN,))
    kinds = column_kinds(header, rows)
    label_rows = [
        LabelRow(line=line, filename=row[FILENAME_COLUMN], values={name: row[name] for name in kinds})
        for line, row in rows
    ]
    return LabelTable(path=Path(path), kinds=kinds, rows=label_rows)


def parse_labels(row: LabelRow, kinds: dict[str, str]) -> dict[str, float | str]:
    """Typed labels of one row; ValueError with the reason when a label is bad."""
    labels: dict[str, float | str] = {}
    for name, kind in kinds.items():
        text = row.values[name]
        if kind == "str":
            labels[name] = text
            continue
        if not text:
            raise ValueError(f"label {name!r} is empty")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"label {name!r} is not a number: {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"label {name!r} is {text!r}, not a finite number")
        if name in EMI_EMOTIONS and not 0.0 <= value <= 1.0:
            raise ValueError(f"label {name!r} = {value} is outside [0, 1]")
        labels[name] = value
    return labels
