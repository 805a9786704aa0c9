"""alignkit.rewards.verifiable against values worked out by hand (written next to each check)."""

from decimal import Decimal

import pytest

from alignkit.errors import ConfigError, DataError
from alignkit.rewards.build import build_reward
from alignkit.rewards.functions import RewardFunction
from alignkit.rewards.verifiable import (
    Keywords,
    LengthLimit,
    NumericMatch,
    RegexMatch,
    WeightedSum,
    extract_number,
    final_answer,
    numbers_equal,
)

# ------------------------------------------------------------------------------------- number parsing


@pytest.mark.parametrize(
    "text, want",
    [
        ("#### 72", "72"),
        ("#### 1,000", "1000"),  # thousands comma
        ("#### 1,234,567.25", "1234567.25"),
        ("#### $18.00", "18"),  # currency before the number
        ("#### €5", "5"),
        ("#### £1,200", "1200"),
        ("#### 25%", "25"),  # percent sign
        ("#### 18 dollars.", "18"),  # unit and trailing period
        ("#### 42 apples per day", "42"),  # unit and trailing text
        ("#### 72.", "72"),  # trailing period is not a decimal point
        ("#### -5", "-5"),  # negative
        ("#### -$5", "-5"),  # sign before the currency ...
        ("#### $-5", "-5"),  # ... or after it
        ("#### −7", "-7"),  # Unicode minus sign
        ("#### 0.50", "0.5"),  # decimals
        ("#### .5", "0.5"),
        ("####0.5", "0.5"),  # no space after the marker
        ("#### 10 because 2 * 5 = 10, not 3", "10"),  # the first number after the marker, not the last
    ],
)
def test_final_answer_after_marker(text, want):
    assert final_answer(text) == Decimal(want)
    assert final_answer(text, require_marker=True) == Decimal(want)


def test_last_marker_wins():
    """GSM8K style reasoning can repeat the marker; the last one is the final answer."""
    assert final_answer("first try #### 10\nrechecking...\n#### 20") == Decimal(20)
    assert final_answer("#### 10 then #### 20 then 30") == Decimal(20)


def test_without_marker_last_number_and_require_marker():
    text = "She buys 3 boxes of 4, so 3 * 4 = 12 eggs."
    assert final_answer(text) == Decimal(12)
    assert final_answer(text, require_marker=True) is None
    assert final_answer("The total is $1,000.") == Decimal(1000)
    assert final_answer("It drops to -3.5 degrees") == Decimal("-3.5")
    assert final_answer("no digits here") is None
    assert final_answer("") is None


def test_marker_without_number_is_none_not_an_earlier_number():
    assert final_answer("I computed 7. #### unknown") is None


@pytest.mark.parametrize(
    "text, want",
    [
        ("3-5", "5"),  # a hyphen between numbers is not a minus sign
        ("1,2,3", "3"),  # a list, not 123
        ("H2O then 7", "7"),  # digits inside a word are not numbers
        ("version 1.2.3 costs 4", "4"),
    ],
)
def test_last_number_ignores_glued_digits(text, want):
    assert final_answer(text) == Decimal(want)


def test_extract_number_takes_the_first():
    assert extract_number(" $1,000.50 per day for 3 days") == Decimal("1000.50")
    assert extract_number("x = -0.25") == Decimal("-0.25")
    assert extract_number("nothing") is None


def test_numbers_equal_is_exact_after_normalisation():
    assert numbers_equal(Decimal("18"), Decimal("18.00"))
    assert numbers_equal(Decimal("0.50"), Decimal(".5"))
    assert numbers_equal(Decimal("-0"), Decimal("0"))
    assert not numbers_equal(Decimal("0.5"), Decimal("0.50001"))
    assert not numbers_equal(None, Decimal(1))
    assert not numbers_equal(None, None)
    # through parsing: "$18.00" and "18" are the same answer, "18" and "-18" are not
    assert numbers_equal(final_answer("#### $18.00"), final_answer("so 18"))
    assert not numbers_equal(final_answer("#### 18"), final_answer("#### -18"))


# -------------------------------------------------------------------------------------- NumericMatch


def test_numeric_match_gsm8k_references():
    """completion final answers 72, 1000, 5 (no marker: last number), none, 0.5
    vs references 72, 1000, 6, 3, 0.50 -> 1, 1, 0, 0, 1."""
    completions = ["48 + 24 = 72\n#### 72", "#### $1,000 dollars.", "2 + 3 = 5", "I am not sure", "#### .5"]
    answers = ["Natalia sold 48/2 = 24 clips.\n#### 72", "#### 1,000", "#### 6", 3, "0.50"]
    got = NumericMatch()(["p"] * 5, completions, answer=answers)
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_numeric_match_require_marker_custom_values_and_column():
    completions = ["so the answer is 72", "#### 72"]
    reward = NumericMatch(answer_column="target", require_marker=True, correct=2, wrong=-1)
    assert reward([None, None], completions, target=["#### 72", 72.0]) == [-1.0, 2.0]
    assert NumericMatch()([None, None], completions, answer=["#### 72", "#### 72"]) == [1.0, 1.0]


def test_numeric_match_missing_column_names_it_and_lists_present():
    with pytest.raises(ConfigError) as e:
        NumericMatch()(["p"], ["#### 1"], solution=["#### 1"], id=[0])
    assert "'answer'" in str(e.value) and "id, solution" in str(e.value)


def test_numeric_match_reference_without_number_and_length_mismatch():
    with pytest.raises(DataError, match=r"'n/a'.*'answer'.*item 1"):
        NumericMatch()(["p", "p"], ["#### 1", "#### 2"], answer=["#### 1", "n/a"])
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        NumericMatch()(["p"], ["#### 1"], answer=["#### 1", "#### 2"])
    with pytest.raises(ConfigError, match="answer_column"):
        NumericMatch(answer_column="")


# ---------------------------------------------------------------------------------------- RegexMatch


def test_regex_search_fullmatch_and_dotall():
    completions = ["<think>a\nb</think> 42", "42", "the answer: 42 ok"]
    assert RegexMatch(r"<think>.*</think>")([None] * 3, completions) == [1.0, 0.0, 0.0]  # DOTALL spans \n
    assert RegexMatch(r"\d+")([None] * 3, completions) == [1.0, 1.0, 1.0]
    assert RegexMatch(r"\d+", search=False)([None] * 3, completions) == [0.0, 1.0, 0.0]


def test_regex_invalid_pattern_is_quoted():
    with pytest.raises(ConfigError) as e:
        RegexMatch("(unclosed")
    assert "'(unclosed'" in str(e.value)


# --------------------------------------------------------------------------------------- LengthLimit


def test_length_limits_are_inclusive():
    """word counts 3, 4, 5 (chars 11, 15, 19)."""
    completions = ["one two six", "one two six ten", "one two six ten ten"]
    assert LengthLimit(max_words=4)([None] * 3, completions) == [1.0, 1.0, 0.0]
    assert LengthLimit(min_words=4)([None] * 3, completions) == [0.0, 1.0, 1.0]
    assert LengthLimit(min_words=4, max_words=4)([None] * 3, completions) == [0.0, 1.0, 0.0]
    assert LengthLimit(max_chars=15)([None] * 3, completions) == [1.0, 1.0, 0.0]
    assert LengthLimit(max_words=0)([None, None], ["", "  \n "]) == [1.0, 1.0]


def test_length_needs_a_valid_limit():
    with pytest.raises(ConfigError, match="at least one"):
        LengthLimit()
    with pytest.raises(ConfigError, match="max_chars"):
        LengthLimit(max_chars=-1)
    with pytest.raises(ConfigError, match="min_words"):
        LengthLimit(min_words=5, max_words=2)


# ------------------------------------------------------------------------------------------ Keywords


def test_keywords_partial_fraction_and_whole_words():
    """required [please, thank you], forbidden [cat]: 3 constraints.
    a: please yes, thank you yes, cat absent ("concatenate" is not "cat") -> 3/3
    b: please no ("pleased" is another word), thank you yes, cat present -> 1/3
    c: PLEASE yes (case-insensitive), thank you no, cat absent -> 2/3"""
    completions = ["Please concatenate them, thank you.", "Pleased, thank you, my cat.", "PLEASE."]
    reward = Keywords(required=["please", "thank you"], forbidden=["cat"])
    assert reward([None] * 3, completions) == [1.0, 1 / 3, 2 / 3]
    strict = Keywords(required=["please", "thank you"], forbidden=["cat"], partial=False)
    assert strict([None] * 3, completions) == [1.0, 0.0, 0.0]


def test_keywords_case_sensitive_and_symbols():
    assert Keywords(required=["Paris"], case_sensitive=True)([None] * 2, ["in Paris", "in paris"]) == [1.0, 0.0]
    # "c++" ends in a symbol: no word boundary after it, one before it ("ac++" does not count)
    assert Keywords(required=["c++"])([None] * 3, ["I like C++.", "ac++", "c+"]) == [1.0, 0.0, 0.0]
    assert Keywords(required="please")([None], ["p l e a s e"]) == [0.0]  # a lone string is one keyword


def test_keywords_errors():
    with pytest.raises(ConfigError, match="at least one"):
        Keywords()
    with pytest.raises(ConfigError, match="both required and forbidden"):
        Keywords(required=["Cat"], forbidden=["cat"])
    with pytest.raises(ConfigError, match="non-empty strings"):
        Keywords(required=[""])


# --------------------------------------------------------------------------------------- WeightedSum


def test_weighted_sum_and_components():
    """numeric_match [1, 0] * 2 + keywords(please) [0, 1] * 0.5 + length(max 3 words) [1, 0] * -1
    -> [2 + 0 - 1, 0 + 0.5 - 0] = [1.0, 0.5]."""
    completions = ["#### 4", "please, the answer is #### 5"]
    reward = WeightedSum([(NumericMatch(), 2.0), (Keywords(required=["please"]), 0.5), (LengthLimit(max_words=3), -1)])
    got = reward([None, None], completions, answer=["4", "4"])
    assert got == [1.0, 0.5]
    parts = reward.components([None, None], completions, answer=["4", "4"])
    assert parts == {"numeric_match": [1.0, 0.0], "keywords": [0.0, 1.0], "length": [1.0, 0.0]}
    assert reward.combine(parts) == got
    assert reward.name == "2*numeric_match + 0.5*keywords + -1*length"


def test_weighted_sum_distinct_names_and_plain_functions():
    def shout(prompts, completions, **columns):
        return [float(c.isupper()) for c in completions]

    reward = WeightedSum([(RegexMatch("a"), 1), (RegexMatch("b"), 1), (shout, 3)])
    assert reward.components([None, None], ["ab", "B"]) == {
        "regex": [1.0, 0.0],
        "regex_2": [1.0, 0.0],
        "shout": [0.0, 1.0],
    }
    assert reward([None, None], ["ab", "B"]) == [2.0, 3.0]


def test_weighted_sum_errors():
    with pytest.raises(ConfigError, match="at least one"):
        WeightedSum([])
    with pytest.raises(ConfigError, match="weight of regex"):
        WeightedSum([(RegexMatch("a"), float("nan"))])
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        WeightedSum([(lambda p, c, **k: [1.0], 1.0)])([None, None], ["a", "b"])


# -------------------------------------------------------------------------------------- build_reward


def test_build_reward_from_name_and_dict():
    reward = build_reward("numeric_match")
    assert isinstance(reward, NumericMatch) and reward.answer_column == "answer" and not reward.require_marker
    reward = build_reward({"name": "keywords", "required": ["please"], "partial": False})
    assert isinstance(reward, Keywords) and reward([None], ["please"]) == [1.0]
    reward = build_reward({"name": "length", "max_words": 2})
    assert reward([None, None], ["a b", "a b c"]) == [1.0, 0.0]
    reward = build_reward({"name": "regex", "pattern": "^#### ", "search": False})
    assert reward([None], ["#### 3"]) == [0.0]  # fullmatch: the pattern does not cover "3"


def test_build_reward_list_gives_weighted_sum():
    reward = build_reward(["numeric_match", {"name": "regex", "pattern": "####", "weight": 0.1}])
    assert isinstance(reward, WeightedSum)
    assert [w for _, w in reward.terms] == [1.0, 0.1]
    assert reward([None, None], ["#### 7", "7"], answer=["7", "8"]) == [1.1, 0.0]
    scaled = build_reward({"name": "regex", "pattern": "x", "weight": -2})
    assert isinstance(scaled, WeightedSum) and scaled([None, None], ["x", "y"]) == [-2.0, 0.0]


def test_build_reward_python_function(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def brevity(prompts, completions, **columns):\n    return [-len(c) for c in completions]\n")
    reward = build_reward(f"{path}:brevity")
    assert isinstance(reward, RewardFunction) and reward([None], ["abc"]) == [-3.0]
    combined = build_reward([{"name": f"{path}:brevity", "weight": 0.5}, "numeric_match"])
    assert combined([None], ["#### 12"], answer=["12"]) == [0.5 * -7 + 1.0]
    with pytest.raises(ConfigError, match="takes no parameters; got scale"):
        build_reward({"name": f"{path}:brevity", "scale": 2})


def test_build_reward_unknown_name_hints_and_lists():
    with pytest.raises(ConfigError) as e:
        build_reward("keyword")
    msg = str(e.value)
    assert "`keyword`" in msg and "Did you mean `keywords`?" in msg
    assert "numeric_match, regex, length, keywords" in msg


def test_build_reward_unknown_param_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        build_reward({"name": "keywords", "requird": ["please"]})
    msg = str(e.value)
    assert "`requird`" in msg and "Did you mean `required`?" in msg
    assert "required, forbidden, case_sensitive, partial" in msg


def test_build_reward_missing_and_malformed_specs():
    with pytest.raises(ConfigError, match="`regex` needs `pattern`"):
        build_reward("regex")
    with pytest.raises(ConfigError, match="needs a `name`"):
        build_reward({"pattern": "x"})
    with pytest.raises(ConfigError, match="`weight` must be a finite number"):
        build_reward([{"name": "numeric_match", "weight": "high"}])
    with pytest.raises(ConfigError, match="empty list"):
        build_reward([])
    with pytest.raises(ConfigError, match="expected a name or a mapping"):
        build_reward(3)


def test_keywords_from_a_column():
    from alignkit.errors import ConfigError, DataError
    from alignkit.rewards.verifiable import Keywords

    kw = Keywords(required_column="words")
    texts = ["The dog caught a frisbee in the park.", "A dog ran.", "Nothing here."]
    words = [["dog", "frisbee", "park"], "dog, park", ["cat"]]
    assert kw(["p"] * 3, texts, words=words) == pytest.approx([1.0, 0.5, 0.0])
    strict = Keywords(required=["the"], required_column="words", partial=False)
    assert strict(["p"] * 2, texts[:2], words=words[:2]) == [1.0, 0.0]  # "A dog ran." lacks "the" and "park"
    with pytest.raises(ConfigError, match="column 'words'"):
        kw(["p"], ["x"], other=["a"])
    with pytest.raises(DataError, match="record 0"):
        kw(["p"], ["x"], words=[3])
