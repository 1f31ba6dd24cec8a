from llmjax.data import chat
from llmjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS, USER, ASSISTANT, END = 1, 2, 3, 4, 5  # written out, so a change to the layout fails here


def test_exact_layout():
    ids, weights = chat.render(TOK, "hi", "ok")
    h, i, o, k = (ord(ch) + 6 for ch in "hiok")
    assert ids == [BOS, USER, h, i, END, ASSISTANT, o, k, EOS]
    assert weights == [0.0] * 6 + [1.0] * 3


def test_weights_cover_exactly_the_response_bytes_and_eos():
    prompt, response = "add 12 + 345 = ", "357 ✓"
    ids, weights = chat.render(TOK, prompt, response)
    n = len(response.encode("utf-8")) + 1
    assert len(ids) == len(weights) == len(prompt.encode("utf-8")) + 4 + n
    assert weights == [0.0] * (len(ids) - n) + [1.0] * n
    assert ids[-n:] == TOK.encode(response, eos=True)
    assert TOK.decode(ids) == prompt + response


def test_empty_response_still_learns_to_stop():
    ids, weights = chat.render(TOK, "x", "")
    assert ids[-2:] == [ASSISTANT, EOS] and weights[-2:] == [0.0, 1.0] and sum(weights) == 1


def test_prompt_only_is_the_prefix_of_the_full_render():
    prompt = "reverse abc = "
    ids, weights = chat.render(TOK, prompt)
    full, _ = chat.render(TOK, prompt, "cba")
    assert ids == chat.prompt_ids(TOK, prompt) == full[: len(ids)]
    assert ids[-1] == ASSISTANT and weights == [0.0] * len(ids)
