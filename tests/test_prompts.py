import math

import pytest

from emi import EMI_EMOTIONS
from emi.prompts import AU_NAMES, NEUTRAL_PROMPT, build_prompt, intensity_word


def emi_labels(**intensities: float) -> dict[str, float]:
    labels = {name: 0.0 for name in EMI_EMOTIONS}
    labels.update({name.replace("_", " "): value for name, value in intensities.items()})
    return labels


def test_paper_example_is_reproduced_exactly():
    labels = {"Expression": "Happy", "AU6": 1, "AU12": 1, "Valence": 0.83, "Arousal": 0.65}
    assert build_prompt(labels) == (
        "Happy (Intensity: High) with AU6 (Cheek Raiser) and AU12 (Lip Corner Puller), Valence=0.83, Arousal=0.65"
    )


@pytest.mark.parametrize(
    "x, word",
    [(0.0, "Low"), (0.29, "Low"), (0.3, "Moderate"), (0.59, "Moderate"), (0.6, "High"), (1.0, "High"), (-0.4, "Low")],
)
def test_intensity_word_cut_points(x, word):
    assert intensity_word(x) == word


def test_intensity_word_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        intensity_word(math.nan)


def test_expression_only_has_no_intensity():
    assert build_prompt({"Expression": "Sad"}) == "Sad"


def test_expression_intensity_comes_from_arousal():
    assert build_prompt({"Expression": "Surprise", "Arousal": 0.1}) == "Surprise (Intensity: Low), Arousal=0.10"


def test_aus_only_in_code_order_with_facs_names():
    labels = {"AU12": 1, "AU4": 0.5, "AU1": 1.0, "AU2": 0.49, "AU45": 1}
    assert build_prompt(labels) == (
        "AU1 (Inner Brow Raiser), AU4 (Brow Lowerer), AU12 (Lip Corner Puller) and AU45 (Blink)"
    )


def test_au_column_with_leading_zero_and_unknown_code():
    assert build_prompt({"AU06": 1, "AU13": 1, "AU99": 1}) == "AU6 (Cheek Raiser)"


def test_no_active_au_is_neutral():
    assert build_prompt({"AU1": 0, "AU12": 0.2}) == NEUTRAL_PROMPT


def test_au_table_covers_affwild2_disfa_bp4d():
    used = {1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 22, 23, 24, 25, 26, 27, 28, 43, 45}
    assert used <= set(AU_NAMES)
    assert AU_NAMES[1] == "Inner Brow Raiser" and AU_NAMES[45] == "Blink"


def test_va_only_two_decimals():
    assert build_prompt({"Valence": -0.456, "Arousal": 0.1}) == "Valence=-0.46, Arousal=0.10"
    assert build_prompt({"Valence": -0.001}) == "Valence=0.00"


def test_va_outside_range_is_missing():
    assert build_prompt({"Valence": -5, "Arousal": 0.25}) == "Arousal=0.25"


def test_emi_dominant_ordered_by_intensity_and_capped():
    labels = emi_labels(Admiration=0.31, Amusement=0.5, Determination=0.2, Excitement=0.7, Joy=0.83, Empathic_Pain=0.45)
    assert build_prompt(labels) == (
        "Joy (Intensity: High), Excitement (Intensity: High) and Amusement (Intensity: Moderate)"
    )


def test_emi_single_dominant_and_tie_order():
    assert build_prompt(emi_labels(Joy=0.6)) == "Joy (Intensity: High)"
    # equal intensities keep EMI_EMOTIONS order
    assert build_prompt(emi_labels(Joy=0.4, Admiration=0.4)) == (
        "Admiration (Intensity: Moderate) and Joy (Intensity: Moderate)"
    )


def test_emi_all_zero_or_below_threshold_is_neutral():
    assert build_prompt(emi_labels()) == NEUTRAL_PROMPT
    assert build_prompt(emi_labels(Joy=0.29, Amusement=0.1)) == NEUTRAL_PROMPT


def test_mixed_emi_aus_va_and_unknown_columns():
    labels = emi_labels(Amusement=0.9)
    labels.update({"AU25": 1, "AU26": 0.7, "Valence": 0.5, "speaker": "A12", "Filename": "clip.mp4"})
    assert build_prompt(labels) == (
        "Amusement (Intensity: High) with AU25 (Lips Part) and AU26 (Jaw Drop), Valence=0.50"
    )


def test_expression_wins_over_emi_columns():
    labels = emi_labels(Joy=0.9)
    labels.update({"Expression": "Anger", "Arousal": 0.4})
    assert build_prompt(labels) == "Anger (Intensity: Moderate), Arousal=0.40"


def test_nan_and_empty_values_are_ignored():
    labels = {"Expression": "", "AU6": math.nan, "AU12": 1, "Valence": math.nan, "Arousal": None, "Joy": math.nan}
    assert build_prompt(labels) == "AU12 (Lip Corner Puller)"


def test_deterministic_regardless_of_column_order():
    labels = {"Arousal": 0.65, "AU12": 1, "Valence": 0.83, "AU6": 1, "Expression": "Happy"}
    assert build_prompt(labels) == build_prompt(dict(reversed(list(labels.items()))))


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"Filename": "x.mp4"}, "no usable value"),
        ({"Valence": math.nan}, "no usable value"),
        ({"Joy": 1.5}, "'Joy'.*\\[0, 1\\]"),
        ({"AU6": "yes"}, "'AU6'.*expected a number"),
        ({"Expression": 3}, "'Expression'.*class name"),
    ],
)
def test_bad_labels_raise_with_column_and_reason(labels, message):
    with pytest.raises(ValueError, match=message):
        build_prompt(labels)
