"""Stage I text prompts built from a sample's labels, following the paper's template

    T = "[Expression Class]" + " with [AU Codes]" + ", Valence=VA1, Arousal=VA2"

e.g. "Happy (Intensity: High) with AU6 (Cheek Raiser) and AU12 (Lip Corner Puller), Valence=0.83, Arousal=0.65".

Rules (all deterministic):
- Intensity words: Low below 0.3, Moderate from 0.3 up to 0.6, High from 0.6 (`intensity_word`); with these
  cut points the paper's own example (Arousal=0.65 -> "High") comes out as printed.
- Primary label: the "Expression" class when given, its intensity read from "Arousal" when present (arousal is
  taken as is, so negative arousal reads Low) and omitted otherwise. Without an expression, the six EMI columns
  (`emi.EMI_EMOTIONS`) give it: the emotions at or above `EMI_DOMINANT_THRESHOLD`, strongest first (ties in
  `EMI_EMOTIONS` order), at most `EMI_MAX_DOMINANT`, each with its intensity word; when none reaches the
  threshold it is `NEUTRAL_PROMPT`. A row with both keeps the expression: it is the paper's primary label.
- Action units: columns named "AU<n>" (also "AU06"); an AU is active when its value is >= `AU_ACTIVE_THRESHOLD`
  (binary occurrence). Active AUs are listed in code order with their FACS names; codes missing from
  `AU_NAMES` are ignored. Negative values (Aff-Wild2's -1 "not annotated") count as missing.
- Valence and arousal are written with 2 decimals; values outside [-1, 1] (Aff-Wild2's -5 "not annotated")
  count as missing.
- Missing values (NaN, None, empty strings) and unknown columns are ignored. When the known columns carry values
  but the text would be empty (e.g. no AU active and nothing else), the prompt is `NEUTRAL_PROMPT`.
- `families` (a subset of emi.config.PROMPT_FAMILIES) keeps only those families' columns: "expression"
  (Expression), "au" (AU<n>), "va" (Valence, Arousal), "emi" (the six EMI columns); a data set in a mix may
  restrict its prompts so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

from emi import EMI_EMOTIONS

INTENSITY_LOW_BELOW = 0.3
INTENSITY_HIGH_FROM = 0.6
EMI_DOMINANT_THRESHOLD = INTENSITY_LOW_BELOW  # an EMI emotion shows in the prompt from "Moderate" up
EMI_MAX_DOMINANT = 3
AU_ACTIVE_THRESHOLD = 0.5
NEUTRAL_PROMPT = "Neutral (Intensity: Low)"

# FACS names of every AU annotated in Aff-Wild2, DISFA and BP4D.
AU_NAMES: dict[int, str] = {
    1: "Inner Brow Raiser",
    2: "Outer Brow Raiser",
    4: "Brow Lowerer",
    5: "Upper Lid Raiser",
    6: "Cheek Raiser",
    7: "Lid Tightener",
    9: "Nose Wrinkler",
    10: "Upper Lip Raiser",
    11: "Nasolabial Deepener",
    12: "Lip Corner Puller",
    14: "Dimpler",
    15: "Lip Corner Depressor",
    16: "Lower Lip Depressor",
    17: "Chin Raiser",
    18: "Lip Pucker",
    20: "Lip Stretcher",
    22: "Lip Funneler",
    23: "Lip Tightener",
    24: "Lip Pressor",
    25: "Lips Part",
    26: "Jaw Drop",
    27: "Mouth Stretch",
    28: "Lip Suck",
    43: "Eyes Closed",
    45: "Blink",
}

_AU_COLUMN = re.compile(r"AU0*([1-9][0-9]*)")


def intensity_word(x: float) -> str:
    """ "Low" below 0.3, "Moderate" from 0.3 up to 0.6, "High" from 0.6."""
    if math.isnan(x):
        raise ValueError("intensity_word: value is NaN")
    if x < INTENSITY_LOW_BELOW:
        return "Low"
    return "Moderate" if x < INTENSITY_HIGH_FROM else "High"


def build_prompt(labels: Mapping[str, float | str], families: Collection[str] | None = None) -> str:
    """The Stage I text for one sample's labels (see the module docstring for the rules), from the columns of
    `families` only where given.

    Unknown columns and missing values are ignored. Raises ValueError when a numeric column holds a non-number,
    an EMI intensity lies outside [0, 1], or no known column carries a value.
    """
    if families is not None:
        labels = {column: value for column, value in labels.items() if _family(column) in families}
    expression = _expression(labels)
    valence = _va_value(labels, "Valence")
    arousal = _va_value(labels, "Arousal")
    emi = _emi_values(labels)
    au_values = _au_values(labels)
    if expression is None and valence is None and arousal is None and not emi and not au_values:
        raise ValueError(f"labels carry no usable value in a known column (columns: {sorted(labels)})")

    if expression is not None:
        primary = expression if arousal is None else f"{expression} (Intensity: {intensity_word(arousal)})"
    elif emi:
        primary = _emi_phrase(emi)
    else:
        primary = ""
    active = [f"AU{code} ({AU_NAMES[code]})" for code in sorted(au_values) if au_values[code] >= AU_ACTIVE_THRESHOLD]
    va = [
        f"{name}={_two_decimals(value)}"
        for name, value in (("Valence", valence), ("Arousal", arousal))
        if value is not None
    ]

    text = primary
    if active:
        text = f"{text} with {_join(active)}" if text else _join(active)
    if va:
        text = ", ".join([text, *va]) if text else ", ".join(va)
    return text or NEUTRAL_PROMPT


def _family(column: str) -> str | None:
    """The prompt family a label column belongs to (None: no family, a column the prompt ignores)."""
    if column == "Expression":
        return "expression"
    if column in ("Valence", "Arousal"):
        return "va"
    if column in EMI_EMOTIONS:
        return "emi"
    return "au" if _AU_COLUMN.fullmatch(column) else None


def _emi_phrase(emi: dict[str, float]) -> str:
    dominant = [name for name in EMI_EMOTIONS if emi.get(name, 0.0) >= EMI_DOMINANT_THRESHOLD]
    dominant.sort(key=lambda name: -emi[name])  # stable: ties keep EMI_EMOTIONS order
    if not dominant:
        return NEUTRAL_PROMPT
    return _join([f"{name} (Intensity: {intensity_word(emi[name])})" for name in dominant[:EMI_MAX_DOMINANT]])


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _two_decimals(x: float) -> str:
    return f"{round(x, 2) + 0.0:.2f}"  # + 0.0 turns -0.0 into 0.0, so -0.001 prints "0.00"


def _is_missing(value: object) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def _number(column: str, value: float | str) -> float | None:
    if _is_missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label column {column!r}: expected a number, got {value!r}") from None
    return None if math.isnan(number) else number


def _expression(labels: Mapping[str, float | str]) -> str | None:
    value = labels.get("Expression")
    if _is_missing(value):
        return None
    if not isinstance(value, str):
        raise ValueError(f"label column 'Expression': expected a class name, got {value!r}")
    return value.strip()


def _va_value(labels: Mapping[str, float | str], column: str) -> float | None:
    if column not in labels:
        return None
    value = _number(column, labels[column])
    return value if value is not None and -1.0 <= value <= 1.0 else None


def _emi_values(labels: Mapping[str, float | str]) -> dict[str, float]:
    values = {}
    for name in EMI_EMOTIONS:
        value = _number(name, labels[name]) if name in labels else None
        if value is None:
            continue
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"label column {name!r}: EMI intensity must lie in [0, 1], got {value}")
        values[name] = value
    return values


def _au_values(labels: Mapping[str, float | str]) -> dict[int, float]:
    values = {}
    for column, raw in labels.items():
        match = _AU_COLUMN.fullmatch(column)
        if match is None or int(match.group(1)) not in AU_NAMES:
            continue
        value = _number(column, raw)
        if value is not None and value >= 0.0:
            values[int(match.group(1))] = value
    return values
