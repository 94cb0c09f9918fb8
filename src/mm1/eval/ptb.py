"""PTB-style caption tokenisation, the input CIDEr-D is defined on.

Every COCO captioning number in the literature is computed on captions that went through the
Stanford PTBTokenizer (`-preserveLines -lowerCase`) and then lost the punctuation tokens listed in
`PUNCTUATION`. A CIDEr computed on raw strings differs by several points, so the tokeniser is part
of the metric. `ptb_tokenize` is a pure-Python re-implementation of that pipeline for ordinary
caption English (lower-casing, clitics `'s n't 're ...`, brackets as `-lrb-` ..., split-off
punctuation, numbers, acronyms and common abbreviations kept whole); `ptb_tokenize_java` calls the
real Stanford jar shipped with pycocoevalcap (Java required) for bit-exact parity with published
numbers. Note that the Stanford tokeniser lower-cases its bracket escapes (`-lrb-`), so the
upper-case `-LRB-` entries of pycocoevalcap's removal list never fire: brackets stay as tokens, and
we keep them too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# tokens pycocoevalcap drops after tokenising (the bracket escapes only in upper case, see above)
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# multi-word forms the PTB lexer splits in two
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
# abbreviations whose period stays on the word
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "jr",
        "sr",
        "prof",
        "vs",
        "etc",
        "mt",
        "ft",
        "inc",
        "ltd",
        "co",
        "corp",
        "jan",
        "feb",
        "aug",
        "sept",
        "oct",
        "nov",
        "dec",
    ]
)

_ABBREV = "|".join(sorted(_ABBREVIATIONS, key=len, reverse=True))
_NOT = re.compile(r"(?<=[a-z])n't(?![a-z])")
_CLITIC = re.compile(r"(?<=[a-z0-9])'(s|d|m|ll|re|ve)(?![a-z])")
# One token; alternatives are tried left to right, so the specific forms come first.
_TOKEN = re.compile(
    rf"""
      (?P<num>\d+(?:[.,:/]\d+)+)                # 3.5  1,000  10:30  3/4/2020
    | (?P<acronym>(?:[a-z]\.){{2,}})             # u.s.a.  a.m.
    | (?P<abbr>(?<![a-z0-9])(?:{_ABBREV})\.(?!\.))  # st.  etc.  mr.
    | (?P<clitic>n't|'(?:s|d|m|ll|re|ve)(?![a-z]))  # contractions, already split from their word
    | (?P<word>@?[a-z0-9]+(?:[-&/'][a-z0-9]+)*)  # e-mail  at&t  and/or  o'clock  @home
    | (?P<sgml></?[a-z][a-z0-9]*>)
    | (?P<bracket>[()\[\]{{}}])
    | (?P<dots>\.+)
    | (?P<qe>[?!]+)                             # "??" survives: only "?" and "!" are removed
    | (?P<dash>-+)
    | (?P<quote>["'`]+)
    | (?P<other>\S)
    """,
    re.VERBOSE,
)


def _tokens(line: str) -> list[str]:
    line = _CLITIC.sub(r" '\1", _NOT.sub(" n't", line.lower()))
    out: list[str] = []
    for m in _TOKEN.finditer(line):
        kind, tok = m.lastgroup, m.group()
        if kind == "word" and tok in _SPLIT_WORDS:
            out.extend(_SPLIT_WORDS[tok].split())
            continue
        if kind == "bracket":
            tok = _BRACKETS[tok]
        elif kind == "quote":
            tok = "'"  # `` '' ` ' all end up removed
        elif kind == "dots":
            tok = "."  # Stanford makes ". ." / "..." of these; every form is removed
        out.append(tok)
    return out


def ptb_tokenize(text: str) -> str:
    """Tokenise one caption the PTB way, lower-case it and drop punctuation tokens; returns the
    tokens joined by single spaces (the string form pycocoevalcap's scorers consume)."""
    text = text.replace("\n", " ")
    return " ".join(t for t in _tokens(text) if t not in PUNCTUATION)


def find_ptb_jar() -> Path | None:
    """The Stanford CoreNLP jar pycocoevalcap ships, or `$MM1_PTB_JAR`; None when absent.
    Only the package location is looked up: pycocoevalcap is not imported."""
    env = os.environ.get("MM1_PTB_JAR")
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        jar = Path(root) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
        if jar.is_file():
            return jar
    return None


def java_available() -> bool:
    return shutil.which("java") is not None and find_ptb_jar() is not None


def ptb_tokenize_java(texts: list[str]) -> list[str]:
    """Tokenise many captions with the real Stanford PTBTokenizer (one JVM start for all), then drop
    punctuation tokens exactly as pycocoevalcap does. Raises if Java or the jar is missing."""
    jar = find_ptb_jar()
    if shutil.which("java") is None or jar is None:
        raise RuntimeError(
            "the Java PTB tokenizer needs `java` on PATH and pycocoevalcap installed "
            "(or MM1_PTB_JAR=/path/to/stanford-corenlp-3.4.1.jar); use tokenizer='python' otherwise"
        )
    if not texts:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        cmd = [
            "java",
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    lines += [""] * (len(texts) - len(lines))
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PUNCTUATION) for line in lines[: len(texts)]]
