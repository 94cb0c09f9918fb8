"""The metrics equal their reference implementations: CIDEr-D vs pycocoevalcap, VQA accuracy vs a
transcription of the official VQAv2 evaluation script (GT-Vision-Lab/VQA vqaEval.py)."""

from __future__ import annotations

import random
import re

import pytest

from mm1.eval.metrics import cider, cider_scores, exact_match, mean_std, option_accuracy, vqa_accuracy
from mm1.eval.ptb import ptb_tokenize, ptb_tokenize_java
from references import require, require_java


def _cider_reference():
    """pycocoevalcap's Cider scorer: needed by the CIDEr-equality tests only (the VQA ones stand alone)."""
    return require("pycocoevalcap.cider.cider").Cider


# ----------------------------------------------------------------------------- CIDEr-D

VOCAB = "a man dog cat red blue sits on the mat with big small ball".split()


def _sentence(rng: random.Random, max_len: int = 14, repeat: bool = False) -> str:
    n = rng.randint(0, max_len)
    if repeat:  # repeated n-grams: "the dog the dog the dog"
        unit = [rng.choice(VOCAB) for _ in range(rng.randint(1, 3))]
        return " ".join((unit * 8)[:n])
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _corpus(seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    n_images = 1 if seed % 7 == 0 else rng.randint(2, 25)
    cands, refs = {}, {}
    for i in range(n_images):
        key = f"img{i}" if seed % 2 else i
        cands[key] = "" if rng.random() < 0.1 else _sentence(rng, repeat=rng.random() < 0.2)
        refs[key] = [_sentence(rng, repeat=rng.random() < 0.1) for _ in range(rng.randint(1, 6))]
        refs[key][0] = refs[key][0] or "a dog"  # pycocoevalcap crashes when every reference is empty
    return cands, refs


@pytest.mark.parametrize("seed", range(30))
def test_cider_equals_pycocoevalcap_on_random_corpora(seed):
    cands, refs = _corpus(seed)
    ref_score, ref_per_image = _cider_reference()().compute_score(refs, {k: [c] for k, c in cands.items()})
    ours = cider_scores(cands, refs, tokenizer="none")
    assert abs(cider(cands, refs, tokenizer="none") - 100 * ref_score) < 1e-9
    for key, theirs in zip(refs, ref_per_image):
        assert abs(ours[key] - 100 * theirs) < 1e-9


def test_cider_edge_cases_match_pycocoevalcap():
    Cider = _cider_reference()
    cases = [
        ({1: ""}, {1: ["a dog"]}),  # one image, empty candidate: ln N = 0
        ({1: "a dog", 2: ""}, {1: ["a dog on a mat"], 2: ["a cat", "the cat"]}),  # empty candidate
        ({1: "the dog the dog the dog", 2: "dog"}, {1: ["the dog the dog", "a dog"], 2: ["a cat"]}),
        ({1: "a", 2: "b"}, {1: ["a"], 2: ["b"]}),  # one-word captions: no bigrams, zero length
        ({i: "a man with a dog" for i in range(3)}, {i: ["a man with a dog"] * 5 for i in range(3)}),
    ]
    for cands, refs in cases:
        theirs, _ = Cider().compute_score(refs, {k: [c] for k, c in cands.items()})
        assert abs(cider(cands, refs, tokenizer="none") - 100 * theirs) < 1e-9


def test_cider_rewards_the_consensus_caption():
    refs = {
        1: ["a red ball on a mat", "a red ball sits on the mat"],
        2: ["a blue cat", "a small blue cat"],
        3: ["a man with a dog", "the man and his dog"],
    }
    good = cider({1: "a red ball on the mat", 2: "a blue cat", 3: "a man with a dog"}, refs)
    bad = cider({1: "a blue cat", 2: "a man with a dog", 3: "a red ball on the mat"}, refs)
    assert good > 100 > bad


def test_cider_tokenises_like_ptb_by_default():
    refs = {1: ["A red ball, on a mat."], 2: ["The cat's bowl."]}
    assert cider({1: "a red ball on a mat", 2: "the cat 's bowl"}, refs) == pytest.approx(
        cider({1: "A red ball on a mat!", 2: "The cat's bowl"}, refs)
    )


def test_cider_rejects_mismatched_ids_with_the_offending_keys():
    with pytest.raises(ValueError, match="without references: \\['9'\\]"):
        cider({1: "a", 9: "b"}, {1: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({1: "a"}, {1: []})


CAPTIONS = [
    "A man's dog (brown) isn't \"happy\" -- it's sad...",
    "The cat can't sit on a [red] {mat}; really? Yes! 3.5 dogs, 1,000 cats: ok.",
    "I'd've done 'quoted' `back' we'll they're you've I'm DON'T Cannot gonna",
    "Wait.. end. Mr. Smith's St. John",
    "The dogs' bowls are on St. John's street near the st.",
    "A red car parked at 10:30, next to 1/2 of a pizza and/or AT&T's logo.",
    "A well-known man -- with a hat - stands; behind him: trees.",
    "\"A cat\" sitting on a 'chair'. Etc. etc.",
    "there's a dog, isn't there?? yes!!! ok....",
    "It was 5pm on 3/4/2020 at 8.30 a.m. in the U.K.",
    "An elephant's trunk, a tiger's tail, and a lion's mane!",
    "Man in a t-shirt playing tennis... great shot!",
    "The image shows: a small circle (left), a big square (right).",
    "Is this a 12-year-old's bike?",
    "Three small blue circles and a large green square on a grey background.",
]


def test_python_ptb_tokeniser_strips_punctuation_like_pycocoevalcap():
    assert ptb_tokenize("A man's dog (brown) isn't \"happy\".") == "a man 's dog -lrb- brown -rrb- is n't happy"
    assert ptb_tokenize("3.5 dogs, 1,000 cats; U.S.A. e-mail!") == "3.5 dogs 1,000 cats u.s.a. e-mail"


def test_python_ptb_tokeniser_agrees_with_the_stanford_jar():
    require_java()
    assert [ptb_tokenize(c) for c in CAPTIONS] == ptb_tokenize_java(CAPTIONS)


# ----------------------------------------------------------------------------- VQA: the official script


class OfficialVQAEval:
    """GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py, transcribed line by line
    (evaluate() reduced to one question). Do not 'fix' it: its quirks are the reference."""

    contractions = {
        "aint": "ain't",
        "arent": "aren't",
        "cant": "can't",
        "couldve": "could've",
        "couldnt": "couldn't",
        "couldn'tve": "couldn't've",
        "couldnt've": "couldn't've",
        "didnt": "didn't",
        "doesnt": "doesn't",
        "dont": "don't",
        "hadnt": "hadn't",
        "hadnt've": "hadn't've",
        "hadn'tve": "hadn't've",
        "hasnt": "hasn't",
        "havent": "haven't",
        "hed": "he'd",
        "hed've": "he'd've",
        "he'dve": "he'd've",
        "hes": "he's",
        "howd": "how'd",
        "howll": "how'll",
        "hows": "how's",
        "Id've": "I'd've",
        "I'dve": "I'd've",
        "Im": "I'm",
        "Ive": "I've",
        "isnt": "isn't",
        "itd": "it'd",
        "itd've": "it'd've",
        "it'dve": "it'd've",
        "itll": "it'll",
        "let's": "let's",
        "maam": "ma'am",
        "mightnt": "mightn't",
        "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've",
        "mightve": "might've",
        "mustnt": "mustn't",
        "mustve": "must've",
        "neednt": "needn't",
        "notve": "not've",
        "oclock": "o'clock",
        "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at",
        "'ow'sat": "'ow's'at",
        "shant": "shan't",
        "shed've": "she'd've",
        "she'dve": "she'd've",
        "she's": "she's",
        "shouldve": "should've",
        "shouldnt": "shouldn't",
        "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd",
        "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll",
        "somebodys": "somebody's",
        "someoned": "someone'd",
        "someoned've": "someone'd've",
        "someone'dve": "someone'd've",
        "someonell": "someone'll",
        "someones": "someone's",
        "somethingd": "something'd",
        "somethingd've": "something'd've",
        "something'dve": "something'd've",
        "somethingll": "something'll",
        "thats": "that's",
        "thered": "there'd",
        "thered've": "there'd've",
        "there'dve": "there'd've",
        "therere": "there're",
        "theres": "there's",
        "theyd": "they'd",
        "theyd've": "they'd've",
        "they'dve": "they'd've",
        "theyll": "they'll",
        "theyre": "they're",
        "theyve": "they've",
        "twas": "'twas",
        "wasnt": "wasn't",
        "wed've": "we'd've",
        "we'dve": "we'd've",
        "weve": "we've",
        "werent": "weren't",
        "whatll": "what'll",
        "whatre": "what're",
        "whats": "what's",
        "whatve": "what've",
        "whens": "when's",
        "whered": "where'd",
        "wheres": "where's",
        "whereve": "where've",
        "whod": "who'd",
        "whod've": "who'd've",
        "who'dve": "who'd've",
        "wholl": "who'll",
        "whos": "who's",
        "whove": "who've",
        "whyll": "why'll",
        "whyre": "why're",
        "whys": "why's",
        "wont": "won't",
        "wouldve": "would've",
        "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've",
        "wouldn'tve": "wouldn't've",
        "yall": "y'all",
        "yall'll": "y'all'll",
        "y'allll": "y'all'll",
        "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've",
        "youd": "you'd",
        "youd've": "you'd've",
        "you'dve": "you'd've",
        "youll": "you'll",
        "youre": "you're",
        "youve": "you've",
    }
    manualMap = {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
    articles = ["a", "an", "the"]
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) != None):  # noqa: E711
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return " ".join(outText)

    def question_accuracy(self, resAns, answers, always=False):
        gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
        resAns = resAns.replace("\n", " ")
        resAns = resAns.replace("\t", " ")
        resAns = resAns.strip()
        resAns = self.processPunctuation(resAns)
        resAns = self.processDigitArticle(resAns)
        gtAcc = []
        gtAnswers = [ans["answer"] for ans in gts]
        if always:  # the "normalise always" mode: every reference gets the prediction's treatment
            for ansDic in gts:
                ansDic["answer"] = ansDic["answer"].replace("\n", " ").replace("\t", " ").strip()
                ansDic["answer"] = self.processDigitArticle(self.processPunctuation(ansDic["answer"]))
        elif len(set(gtAnswers)) > 1:
            for ansDic in gts:
                ansDic["answer"] = self.processPunctuation(ansDic["answer"])
        for gtAnsDatum in gts:
            otherGTAns = [item for item in gts if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
            acc = min(1, float(len(matchingAns)) / 3)
            gtAcc.append(acc)
        return float(sum(gtAcc)) / len(gtAcc)


# fragments that exercise every rule: each punctuation mark, digit-comma-digit, periods before and
# after digits, number words, articles, contractions (incl. the upper-case table keys), case, tabs
FRAGMENTS = [
    "two",
    "Two",
    "2",
    "ten",
    "none",
    "zero",
    "one",
    "the",
    "A",
    "an",
    "dog",
    "dogs",
    "dont",
    "Dont",
    "isnt",
    "oclock",
    "Ive",
    "yes",
    "No",
    "3.5",
    "1,000",
    "1,0",
    "5.",
    ".5",
    "red",
    "y'allll",
    "what's",
    "somebody'd",
    "twas",
    "TV",
    "e.g.",
    "...",
]
MARKS = list(OfficialVQAEval.punct) + [".", "'", ":"]
GLUES = [" ", " ", " ", "", "\n", "\t", "  "]


def _answer(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.6:
            parts.append(rng.choice(FRAGMENTS))
        elif r < 0.9:
            parts.append(rng.choice(MARKS))
        else:
            parts.append(rng.choice(FRAGMENTS) + rng.choice(MARKS) + rng.choice(FRAGMENTS))
    text = "".join(p + rng.choice(GLUES) for p in parts)
    return rng.choice(["", " ", "\t"]) + text if rng.random() < 0.2 else text


def _question(rng: random.Random) -> tuple[str, list[str]]:
    pool = [_answer(rng) if rng.random() < 0.7 else rng.choice(FRAGMENTS[:20]) for _ in range(rng.randint(1, 4))]
    answers = [rng.choice(pool) for _ in range(10)]
    pred = rng.choice(pool + [_answer(rng), pool[0].upper(), "The " + pool[0] + "."])
    return pred, answers


def test_vqa_accuracy_equals_the_official_script_per_question():
    rng, ref = random.Random(0), OfficialVQAEval()
    nonzero = [0, 0]
    for _ in range(3000):
        pred, answers = _question(rng)
        ours = vqa_accuracy(pred, answers, mode="official")
        assert ours == ref.question_accuracy(pred, answers), (pred, answers)
        always = vqa_accuracy(pred, answers)
        assert always == ref.question_accuracy(pred, answers, always=True), (pred, answers)
        nonzero[0] += ours > 0
        nonzero[1] += always > 0
    assert nonzero[0] > 100 and nonzero[1] > 1000, nonzero  # the generator produces matches, not only misses


def test_vqa_accuracy_covers_each_normalisation_rule():
    ref = OfficialVQAEval()
    cases = [
        ("Two", ["2"] * 10),
        ("the dog.", ["dog"] * 10),
        ("dont", ["don't"] * 10),
        ("yes\t", ["yes"] * 10),
        ("1,000", ["1000"] * 10),
        ("3.5", ["3.5"] * 10),
        ("a-b", ["a b"] * 10),
        ("(red)", ["red"] * 10),
        ("a" + "." * 40 + "b", ["ab"] * 10),
        ("none", ["0"] * 10),
    ]
    for pred, answers in cases:
        assert vqa_accuracy(pred, answers, mode="official") == ref.question_accuracy(pred, answers)
        assert vqa_accuracy(pred, answers) == ref.question_accuracy(pred, answers, always=True)
    # the known values of the leave-one-out average
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # the modes differ exactly where the official script skips normalising agreeing references
    assert vqa_accuracy("2", ["Two"] * 10, mode="official") == 0.0
    assert vqa_accuracy("2", ["Two"] * 10, mode="always") == 1.0


def test_exact_match_and_option_accuracy():
    assert exact_match("The Dog.", "dog") == 1.0
    assert exact_match("The Dog.", "dog", normalize=False) == 0.0
    assert exact_match("two", ["3", "2"]) == 1.0
    assert option_accuracy([0, 2, 1, 1], [0, 2, 3, 1]) == 0.75
    with pytest.raises(ValueError, match="3 predictions for 2 questions"):
        option_accuracy([1, 2, 3], [1, 2])
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_cider_with_the_java_tokenizer_matches_the_python_one_on_caption_english():
    require_java()
    refs = {i: [CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(3)] for i in range(6)}
    cands = {i: CAPTIONS[(i * 5) % len(CAPTIONS)] for i in range(6)}
    assert cider(cands, refs, tokenizer="java") == pytest.approx(cider(cands, refs, tokenizer="python"), abs=1e-9)
