"""The benchmark metrics on hand-worked examples.

Every expected number below was worked out by hand from the official scoring logic named in each
test, and cross-checked by running that logic (the copies lmms-eval 0.7.3 ships: EvalAIAnswerProcessor
+ MMF's TextVQAAccuracyEvaluator, the RRC `anls`, pix2struct's `relaxed_correctness`, OCRBench's
scoring loop, VLMEvalKit's `can_infer`) on the same predictions.
"""

import pytest

from cogvlm2.eval.choice import circular_rotations, extract_choice, mcq_prompt
from cogvlm2.eval.metrics import HME_CATEGORY, anls, levenshtein, ocrbench_hit, relaxed_accuracy, relaxed_correctness
from cogvlm2.eval.vqa_accuracy import normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, norm", [
    ("Coca-Cola", "coca cola"),          # '-' with no space beside it splits the word
    ("Two.", "2"),                       # period not before a digit dropped; number word -> digit
    ("the 22", "22"),                    # article dropped
    ("3.5", "3.5"),                      # a decimal point stays
    ("1,000", "1000"),                   # commas are dropped before anything else
    ("John's", "john 's"),               # possessive split
    ("dont", "don't"),                   # contraction restored
    ("a - b", "b"),                      # '-' next to a space is deleted ('a' is an article)
    ("Stop!", "stop"),
    ("  Yes\n", "yes"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    # MMF TextVQAAccuracyEvaluator: mean over the 10 leave-one-out subsets of min(#matches / 3, 1)
    refs = ["Coca-Cola"] * 3 + ["coca cola"] * 4 + ["coke"] * 3   # 7 normalise to "coca cola"
    assert vqa_accuracy("Coca Cola", refs) == 1.0
    assert vqa_accuracy("coke", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    one_yes = ["yes"] + ["no"] * 9
    assert vqa_accuracy("yes", one_yes) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("Yes.", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("two", ["2"] * 2 + ["22"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("maybe", one_yes) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_anls():
    # RRC DocVQA / InfographicVQA evaluator: normalised strings, distance / max(raw lengths), best reference
    refs = ["1/8/93", "January 8, 1993"]
    assert anls("1/8/93", refs) == 1.0
    assert anls("January 8 1993", refs) == pytest.approx(1 - 1 / 15)
    # the official divisor uses the raw strings: 16 characters here, not the 14 after normalising
    assert anls("Annual  Reports ", ["Annual Report"]) == pytest.approx(1 - 1 / 16)
    assert anls("ANNUAL REPORT", ["annual report"]) == 1.0
    assert anls("abxy", ["abcd"]) == 0.5      # similarity exactly 0.5 is kept
    assert anls("axyz", ["abcd"]) == 0.0      # below the threshold: 0
    assert anls("", [""]) == 1.0


def test_relaxed_correctness():
    # pix2struct metrics.relaxed_correctness (the ChartQA relaxed accuracy)
    assert relaxed_correctness("24.5", "25")           # 2.0% off
    assert not relaxed_correctness("24.5", "26")       # 6.1% off
    assert relaxed_correctness("37%", "0.37")          # percentages read as fractions
    assert relaxed_correctness("37%", "38%")           # 0.38 vs 0.37: 2.7% off
    assert not relaxed_correctness("37%", "37")
    assert relaxed_correctness("2018", "2019")         # years are numbers too (0.05% off): the official quirk
    assert not relaxed_correctness("0", "0.01")        # a zero target needs an exact match
    assert relaxed_correctness("Yes", "yes")
    assert relaxed_accuracy(" 25 \n", ["24.5"]) == 1.0  # VLMEvalKit strips the prediction
    assert relaxed_accuracy("No", ["Yes"]) == 0.0


def test_ocrbench_rule():
    # OCRBench scoring loop: substring of the lower-cased prediction; HME100k: spaces removed, case kept
    assert ocrbench_hit("The word is centre.", ["CENTRE"], "Regular Text Recognition") == 1
    assert ocrbench_hit("x^{2} + 1", ["x ^ { 2 } + 1"], HME_CATEGORY) == 1
    assert ocrbench_hit("X^{2}+1", ["x ^ { 2 } + 1"], HME_CATEGORY) == 0
    assert ocrbench_hit("$1,250", ["$ 1,250"], "Doc-oriented VQA") == 0
    assert ocrbench_hit("Date:\n10/26/98", ["10/26/98"], "Key Information Extraction") == 1
    assert ocrbench_hit("paris", ["London", "Paris"], "Scene Text-centric VQA") == 1


OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("answer, letter", [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ("The answer is D", "D"), ("Answer: [B]", "B"),
    ("I think it is blue", "C"),                      # no letter: the option text decides
    ("A or B", None),                                  # two letters, and no option text
    ("A dog sits on a mat near the window today", None),  # 'A' too early (not in the last five words)
    ("red or green", None),                            # two option texts
    ("", None),
])
def test_extract_choice(answer, letter):
    # VLMEvalKit can_infer (can_infer_option, then can_infer_text)
    assert extract_choice(answer, OPTIONS) == letter


def test_mcq_prompt():
    assert mcq_prompt("What colour?", {"A": "red", "B": "blue"}, hint="Look.") == (
        "Look.\nWhat colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly.\n"
        "Short Answer.")
    chinese = mcq_prompt("什么颜色?", {"A": "红", "B": "蓝"})
    assert chinese.endswith("\n请直接回答选项字母。\nShort Answer.")


def test_circular_rotations():
    rots = circular_rotations({"A": "red", "B": "green", "C": "blue"}, "B")
    assert rots[0] == ({"A": "red", "B": "green", "C": "blue"}, "B")
    assert rots[1] == ({"A": "green", "B": "blue", "C": "red"}, "A")
    assert rots[2] == ({"A": "blue", "B": "red", "C": "green"}, "C")
    assert all(opts[ans] == "green" for opts, ans in rots)
