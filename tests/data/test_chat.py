import json
from pathlib import Path

import pytest

from llmjax.data import chat
from llmjax.data.hf_tokenizer import HFTokenizer, write_files
from llmjax.data.tokenizer import ByteTokenizer, get_tokenizer

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


# A Hugging Face tokenizer renders through its Jinja template: here the byte tokenizer's export (a character is
# its byte + 6, "<s>" is bos and "</s>" eos), given templates of the kinds real models ship.


def _hf(tmp_path: Path, template: str | None, **config) -> HFTokenizer:
    write_files("byte", str(tmp_path))
    path = tmp_path / "tokenizer_config.json"
    merged = json.loads(path.read_text()) | {"chat_template": template} | config
    path.write_text(json.dumps({k: v for k, v in merged.items() if v is not None}))
    return get_tokenizer(f"hf:{tmp_path}")


def _b(text: str) -> list[int]:
    return [b + 6 for b in text.encode("utf-8")]


def test_template_text_after_eos_is_fed_but_never_a_target(tmp_path):
    """ChatML's newline after the end of turn: generation stops at eos, so the newline is never produced."""
    tok = _hf(tmp_path, "{% for m in messages %}{{ m['role'] + ':' + m['content'] + eos_token + '\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    head = _b("user:hi") + [EOS] + _b("\nassistant:")
    assert chat.prompt_ids(tok, "hi") == head
    assert chat.render(tok, "hi", "ok") == (head + _b("ok") + [EOS] + _b("\n"), [0.0] * len(head) + [1, 1, 1, 0])


def test_template_without_eos_gets_one(tmp_path):
    tok = _hf(tmp_path, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, weights = chat.render(tok, "hi", "ok")
    head = _b("user: hi\nassistant: ")
    assert ids == head + _b("ok\n") + [EOS] and weights == [0.0] * len(head) + [1.0] * 4


def test_no_template_and_no_bos_render_llmjax_layout_without_bos(tmp_path):
    tok = _hf(tmp_path, None, bos_token=None)
    assert tok.bos_id is None
    ids, weights = chat.render(ByteTokenizer(), "hi", "ok")
    assert chat.render(tok, "hi", "ok") == (ids[1:], weights[1:])


def test_template_problems_are_one_line_errors(tmp_path):
    tok = _hf(tmp_path / "a", "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                              "{% if add_generation_prompt %}assistant:\n{% endif %}")
    assert chat.prompt_ids(tok, "hi") == _b("user: hi\nassistant:\n")
    with pytest.raises(ValueError, match=r"no prefix .* goes on '\\n' where that has ' ok\\n'") as e:
        chat.render(tok, "hi", "ok")
    assert str(tmp_path / "a") in str(e.value) and "\n" not in str(e.value)
    tok = _hf(tmp_path / "b", "{{ raise_exception('system messages only') }}")
    with pytest.raises(ValueError, match="chat template of .* fails: system messages only"):
        chat.prompt_ids(tok, "hi")
    with pytest.raises(ValueError, match="fails: .*endfor"):
        chat.prompt_ids(_hf(tmp_path / "c", "{% for m in messages %}"), "hi")
