"""Rule rewards on edge cases: what is and is not a correct, checkable answer."""

from __future__ import annotations

import pytest

from megatron_omni.rl.rewards import (REWARDS, RewardError, RewardTarget, check_reward_weights, combined_reward,
                                      exact_match, format_reward, multiple_choice, numeric, parse_number)


def T(answer, **kw):
    return RewardTarget.from_row({"answer": answer, **kw}, "m.jsonl:3")


@pytest.mark.parametrize("response,expected", [
    ("Answer: red", 1.0), ("answer:   RED.", 1.0), ("Red", 1.0), ("  red!  ", 1.0), ("The red", 1.0),
    ("Answer: blue", 0.0), ("Answer: red circle", 0.0), ("", 0.0), ("Answer:", 0.0),
    ("I think blue. Answer: red", 1.0),  # the last "Answer:" holds the answer
    ("Answer: red. Answer: blue", 0.0),
])
def test_exact_match(response, expected):
    assert exact_match(response, T("red")) == expected


def test_exact_match_multiword_whitespace_and_case():
    assert exact_match("Answer:  Omni   MODEL", T("omni model")) == 1.0
    assert exact_match("Answer: omnimodel", T("omni model")) == 0.0


@pytest.mark.parametrize("response,expected", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("B) a square", 1.0), ("Answer: B", 1.0), ("answer: (b)", 0.0),
    ("The answer is B.", 1.0), ("Option B", 1.0),
    ("A", 0.0), ("A or B", 0.0), ("B, C", 0.0),  # another letter, or more than one letter
    ("A red square. Answer: B", 1.0),  # the article "A" is not option A
    ("A square", 1.0),  # the option's text instead of its letter
    ("Because", 0.0), ("", 0.0),
])
def test_multiple_choice(response, expected):
    target = T("B", choices=["a circle", "a square", "a triangle", "a star"])
    assert multiple_choice(response, target) == expected


def test_multiple_choice_letters_beyond_the_options_do_not_count():
    target = T("B", choices=["x", "y"])
    assert multiple_choice("B", target) == 1.0
    assert multiple_choice("Answer: D", target) == 0.0
    with pytest.raises(RewardError, match=r"m.jsonl:3: multiple_choice needs .* one option letter A..B"):
        multiple_choice("B", T("C", choices=["x", "y"]))


@pytest.mark.parametrize("response,expected", [
    ("Answer: 42", 1.0), ("42", 1.0), ("17 plus 25 is 42.", 1.0), ("Answer: 42.0", 1.0),
    ("Answer: 41", 0.0), ("Answer: 420", 0.0), ("Answer: 4.2", 0.0), ("forty-two", 0.0), ("", 0.0),
    ("Answer: 42 or 43", 0.0),  # the last number is what counts
    ("x42", 0.0), ("Answer: 84/2", 1.0), ("Answer: 4,2", 0.0),
])
def test_numeric_exact(response, expected):
    assert numeric(response, T("42")) == expected


def test_numeric_tolerance_sign_words_and_separators():
    assert numeric("Answer: 3.14", T(3.14159, tolerance=0.01)) == 1.0
    assert numeric("Answer: 3.1", T(3.14159, tolerance=0.01)) == 0.0
    assert numeric("Answer: -7", T("-7")) == 1.0
    assert numeric("Answer: \u22127", T("-7")) == 1.0  # unicode minus
    assert numeric("Answer: 7", T("-7")) == 0.0
    assert numeric("Answer: 1,234,567", T(1234567)) == 1.0
    assert numeric("I hear three beeps.", T(3)) == 1.0
    assert numeric("Answer: .5", T("0.5")) == 1.0
    assert numeric("Answer: 1/0", T(1)) == 0.0
    assert parse_number("twenty") == 20.0 and parse_number("1/4") == 0.25 and parse_number("abc") is None
    with pytest.raises(RewardError, match="numeric needs metadata.answer to be a number"):
        numeric("1", T("red"))


def test_format():
    t = T("7")
    assert format_reward("Answer: 7", t) == 1.0
    assert format_reward("  Answer: seven  ", t) == 1.0
    assert format_reward("The answer is 7", t) == 0.0
    assert format_reward("Answer: 7\nbecause", t) == 0.0
    assert format_reward("Answer:", t) == 0.0
    custom = T("7", format=r"<answer>\d+</answer>")
    assert format_reward("<answer>7</answer>", custom) == 1.0
    assert format_reward("Answer: 7", custom) == 0.0


def test_combined_reward_and_registry():
    target = T("7")
    assert combined_reward("Answer: 7", target, {"numeric": 1.0, "format": 0.25}) == 1.25
    assert combined_reward("It is 7", target, {"numeric": 1.0, "format": 0.25}) == 1.0
    assert combined_reward("Answer: 8", target, {"numeric": 1.0, "format": 0.25}) == 0.25
    assert set(REWARDS) == {"exact_match", "multiple_choice", "numeric", "format"}
    with pytest.raises(RewardError, match=r"src: unknown reward\(s\) \['numerical'\]"):
        check_reward_weights({"numerical": 1.0}, "src")
    with pytest.raises(RewardError, match="at least one > 0"):
        check_reward_weights({"numeric": 0.0}, "src")


def test_targets_from_bad_rows_name_the_row():
    with pytest.raises(RewardError, match=r"m.jsonl:3: a GSPO sample needs metadata.answer"):
        RewardTarget.from_row({}, "m.jsonl:3")
    with pytest.raises(RewardError, match="m.jsonl:3: metadata.choices"):
        RewardTarget.from_row({"answer": "A", "choices": ["only one"]}, "m.jsonl:3")
    with pytest.raises(RewardError, match="m.jsonl:3: metadata.tolerance"):
        RewardTarget.from_row({"answer": 1, "tolerance": -1}, "m.jsonl:3")
    with pytest.raises(RewardError, match="m.jsonl:3: metadata.format is not a valid regex"):
        RewardTarget.from_row({"answer": 1, "format": "("}, "m.jsonl:3")


def test_blend_source_rewards_are_checked_at_load(tmp_path):
    from megatron_omni.config.loader import ConfigError
    from megatron_omni.data.blend import load_blend

    path = tmp_path / "gspo.yaml"
    path.write_text("sources:\n  - {name: q, manifest: m.jsonl, modality: text, rewards: {numerik: 1.0}}\n")
    with pytest.raises(ConfigError, match=r"blend 'gspo': source 'q': unknown reward\(s\) \['numerik'\]; choose from"):
        load_blend(str(path))
    path.write_text("sources:\n  - {name: q, manifest: m.jsonl, modality: text, rewards: {numeric: 1.0, format: 0.1}}\n")
    assert load_blend(str(path)).sources[0].rewards == {"numeric": 1.0, "format": 0.1}
