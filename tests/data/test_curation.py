import numpy as np
import pytest

from llmjax.data.curation import (
    COUNT_KEYS,
    FILTERS,
    CurationConfig,
    count_sentences,
    curate,
    jaccard,
    shingles,
)

CLEAN = "\n".join([
    "The river flows slowly through the old town every spring.",
    "Visitors often stop on the stone bridge to watch the ducks below.",
    "In the evening the market square fills with music and the smell of bread.",
    "Local families have run the same bakery there for more than a century!",
    "Would you not want to taste the rye loaf that made it famous?",
])
OTHER = "\n".join([
    "Mountain weather changes quickly, so hikers should carry a warm layer.",
    "The northern trail climbs steeply for three miles before the ridge.",
    "From the summit on a clear day you can see four distinct lakes.",
    "Rangers recommend starting early to avoid the afternoon thunderstorms.",
    "Bring plenty of water, because there are no springs along the route.",
])

# filter -> what it should remove from a doc that is otherwise CLEAN: a line (line filters) or the doc
LINE_CASES = {
    "terminal_punct": "To be continued in our next weekly issue...",
    "line_words": "Thanks so much!",
    "boilerplate": "Please enable JavaScript in your browser to see the comments.",
}
DOC_CASES = {
    "lorem_ipsum": CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "curly_brace": CLEAN + "\nSet the template field to {name} before you send it.",
    "bad_words": CLEAN + "\nHonestly, the review that called it bullshit was unfair.",
    "min_sentences": " ".join(CLEAN.replace(".", ",").replace("!", ",").replace("?", ",").split("\n")) + ".",
    "min_words": "The cat sat on the mat.\nThe dog slept by the door.\nThe bird sang in the tree.",
}


def test_clean_document_is_kept_unchanged():
    kept, counts = curate([CLEAN])
    assert kept == [CLEAN]
    assert set(counts) == set(COUNT_KEYS)
    assert counts["docs_in"] == counts["docs_out"] == 1 and counts["lines_in"] == 5
    assert sum(counts[k] for k in FILTERS) == 0


@pytest.mark.parametrize("name", list(LINE_CASES))
def test_line_filter_removes_its_line_and_switches_off(name):
    line = LINE_CASES[name]
    doc = CLEAN + "\n  " + line + "  \n\n"  # stripped and blank lines are not counted
    kept, counts = curate([doc])
    assert kept == [CLEAN]
    assert counts[name] == 1 and counts["lines_in"] == 6
    assert sum(counts[k] for k in FILTERS) == 1
    kept, counts = curate([doc], CurationConfig().without(name))
    assert kept == [CLEAN + "\n" + line] and counts[name] == 0


@pytest.mark.parametrize("name", list(DOC_CASES))
def test_doc_filter_removes_its_doc_and_switches_off(name):
    doc = DOC_CASES[name]
    kept, counts = curate([doc, OTHER])
    assert kept == [OTHER]
    assert counts[name] == 1 and counts["docs_out"] == 1
    assert sum(counts[k] for k in FILTERS) == 1
    kept, counts = curate([doc, OTHER], CurationConfig().without(name))
    assert kept == [doc, OTHER] and counts[name] == 0


def test_doc_filters_see_only_surviving_lines():
    """As in C4: a code line already dropped for its missing end mark does not cost the page."""
    kept, counts = curate([CLEAN + "\nfunction f() { return 1 }"])
    assert kept == [CLEAN] and counts["terminal_punct"] == 1 and counts["curly_brace"] == 0


def test_documents_with_no_lines_left_count_as_empty():
    kept, counts = curate(["Home | About | Contact\nSubscribe", "  \n", OTHER])
    assert kept == [OTHER] and counts["empty"] == 2 and counts["terminal_punct"] == 2


def test_bad_words_match_whole_words_and_phrases():
    cfg = CurationConfig(bad_words=("frobnicate", "warp drive"))
    assert curate([CLEAN + "\nThey frobnicated the data all night long."], cfg)[1]["bad_words"] == 0
    assert curate([CLEAN + "\nThey unfrobnicate the data all night long."], cfg)[1]["bad_words"] == 0
    assert curate([CLEAN + "\nThey would Frobnicate the data all night."], cfg)[1]["bad_words"] == 1
    assert curate([CLEAN + "\nThe ship has a WARP DRIVE and a cat."], cfg)[1]["bad_words"] == 1
    assert curate([CLEAN + "\nBullshit, said nobody at the bakery today."], cfg)[1]["bad_words"] == 0


def test_count_sentences():
    assert count_sentences("One. Two! Three? 'Four.' \"Five?\" Six... 3.5 is a number") == 6
    assert count_sentences("no end mark") == 0


def test_exact_dedup_ignores_case_and_whitespace():
    shouting = CLEAN.upper().replace(" ", "   ")
    kept, counts = curate([CLEAN, OTHER, shouting])
    assert kept == [CLEAN, OTHER] and counts["exact_dedup"] == 1 and counts["minhash"] == 0
    kept, counts = curate([CLEAN, OTHER, shouting], CurationConfig().without("exact_dedup"))
    assert counts["exact_dedup"] == 0 and counts["minhash"] == 1  # the near-duplicate pass still catches it
    kept, _ = curate([CLEAN, OTHER, shouting], CurationConfig().without("exact_dedup", "minhash"))
    assert kept == [CLEAN, OTHER, shouting]


def words(seed: int, n: int = 200) -> list[str]:
    return [f"w{i}" for i in np.random.default_rng(seed).integers(0, 5000, n)]


def as_doc(ws: list[str]) -> str:
    """Ten-word sentences, one per line, so every heuristic filter keeps it."""
    return "\n".join(" ".join(ws[i:i + 10]) + "." for i in range(0, len(ws), 10))


def test_minhash_removes_a_one_word_edit_but_keeps_different_documents():
    base = words(0)
    edited = base.copy()
    edited[100] = "changed"
    reworded = base.copy()
    reworded[::8] = words(2, len(reworded[::8]))  # every 8th word replaced: shingle Jaccard far below 0.8
    docs = [as_doc(base), as_doc(words(1)), as_doc(edited), as_doc(reworded)]
    assert jaccard(shingles(docs[0], 5), shingles(docs[2], 5)) == pytest.approx(191 / 201)
    assert jaccard(shingles(docs[0], 5), shingles(docs[3], 5)) < 0.3
    kept, counts = curate(docs)
    assert kept == [docs[0], docs[1], docs[3]]
    assert counts["minhash"] == 1 and counts["exact_dedup"] == 0
    kept, counts = curate(docs, CurationConfig().without("minhash"))
    assert kept == docs and counts["minhash"] == 0
    kept, counts = curate(docs, CurationConfig(minhash_threshold=0.99))
    assert kept == docs


def test_config_validation():
    with pytest.raises(ValueError, match="unknown filters"):
        CurationConfig(enabled={"minhash", "typo"})
    with pytest.raises(ValueError, match="divide"):
        CurationConfig(bands=12)
    with pytest.raises(ValueError, match="threshold"):
        CurationConfig(minhash_threshold=0)
