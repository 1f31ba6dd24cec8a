import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers

from llmjax.data import chat, hf_tokenizer
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.data.hf_tokenizer import CHAT_TEMPLATE, HFTokenizer, write_files
from llmjax.data.tokenizer import get_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"
WORDS = ["the", "quick", "fox", "hello", "world", "café", "naïve", "日本", "語", "12", "345", "add", "=", "+", "?"]
EDGE = ["", " ", "  ", "\n", "\n\n", "a", " a", "a ", "a  b", "  lead", "trail  ", "two\nlines\n", "\ttab\t",
        "12345", "add 12 + 345 = 357", "é", "café naïve", "日本", "日本語 text", "🙂", "emoji 🙂🚀 mix", "x" * 300,
        "<0x41>", "a<0xE6>b", "<>x0AF", "▁", "a▁ b", "Ω≈ç√∫˜µ≤≥÷", "\r\n", "\x00\x7f"]


def _texts() -> list[str]:
    """About 200 strings: the edge cases above, then random runs of words, spaces, newlines, digits and emoji."""
    rng = random.Random(0)
    parts = WORDS + [" ", "  ", "\n", "\t", "é", "ü", "🙂", "🚀", "<", ">", "x", "0", "A", "ab"]
    return EDGE + ["".join(rng.choice(parts) for _ in range(rng.randint(1, 16))) for _ in range(170)]


TEXTS = _texts()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """BPE (with merges) and unigram models trained by llmjax on words, sums and unicode, and with markup such as
    "<A>" and "0xFF" (byte pieces' spellings then consist of known characters), or without it ("unigram_plain")."""
    root = tmp_path_factory.mktemp("trained")
    rng = random.Random(1)
    words = WORDS * 4 + ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8))) for _ in range(60)]
    plain = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    markup = plain + [f"<{rng.choice('ABCDEF')}> 0x{rng.randint(0, 255):02X}" for _ in range(300)]
    for corpus, lines in (("plain", plain), ("markup", markup)):
        (root / f"{corpus}.txt").write_text("\n".join(lines), encoding="utf-8")
    return {name: tokenizer_lib.train([str(root / f"{corpus}.txt")], 400, kind, str(root / f"{name}.model"))
            for name, corpus, kind in (("bpe", "markup", "bpe"), ("unigram", "markup", "unigram"),
                                       ("unigram_plain", "plain", "unigram"))}


@pytest.fixture(scope="module", params=["byte", "synthetic", "bpe", "unigram", "unigram_plain"])
def exported(request, trained, tmp_path_factory) -> tuple:
    """(llmjax's tokenizer, the same exported by write_files and loaded as hf:DIR, DIR)."""
    name = trained.get(request.param, request.param)
    out = str(tmp_path_factory.mktemp(f"export_{request.param}"))
    assert write_files(name, out) == [f"{out}/tokenizer.json", f"{out}/tokenizer_config.json"]
    return get_tokenizer(name), get_tokenizer(f"hf:{out}"), out


def test_trained_bpe_merges(trained):
    tok = get_tokenizer(trained["bpe"])
    assert len(tok.encode("hello world café")) <= 4  # whole words: the export has merges to replay


def test_export_encodes_and_decodes_exactly(exported):
    native, hf, _ = exported
    assert isinstance(hf, HFTokenizer)
    assert (hf.pad_id, hf.bos_id, hf.eos_id, hf.vocab_size) == (native.pad_id, native.bos_id, native.eos_id,
                                                                 native.vocab_size)
    for text in TEXTS:
        ids = native.encode(text, bos=True, eos=True)
        assert hf.encode(text, bos=True, eos=True) == ids, text
        assert hf.decode(ids) == native.decode(ids), text
        if "▁" not in text:  # sentencepiece reads "▁" as a space, both ways
            assert hf.decode(ids) == text


def test_export_chat_renders_like_native(exported):
    native, hf, _ = exported
    assert hf.chat_template == CHAT_TEMPLATE
    for prompt, response in zip(TEXTS[::2], TEXTS[1::2], strict=False):
        assert chat.prompt_ids(hf, prompt) == chat.prompt_ids(native, prompt)
        assert chat.render(hf, prompt, response) == chat.render(native, prompt, response)
        assert chat.render(hf, prompt) == chat.render(native, prompt)


def test_export_spelled_specials_become_tokens(exported):
    """The one difference, the format's: text spelling a special token encodes to it, as chat templates need."""
    native, hf, _ = exported
    markers = [native.special_ids[m] for m in ("<|user|>", "<|end|>")]
    assert hf.encode("<|user|>x<|end|>") == [markers[0], *native.encode("x"), markers[1]]
    assert not set(native.encode("<|user|>x<|end|>")) & set(markers)


# transformers' own outputs, recorded by tests/fixtures/hf/make_fixtures.py


def _fixture(name: str) -> HFTokenizer:
    return get_tokenizer(f"hf:{FIXTURES / name}")


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((FIXTURES / "chat.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gpt2"])
def test_fixture_encodings_and_decode(name, recorded):
    tok, rec = _fixture(name), recorded[name]
    for case in rec["encodings"]:
        assert tok.encode(case["text"]) == case["ids_plain"]
        with_bos = tok.encode(case["text"], bos=True)
        assert with_bos == ([] if tok.bos_id is None else [tok.bos_id]) + case["ids_plain"]
        if name != "gpt2":  # as Llama's post-processor adds bos and Qwen's nothing; GPT-2's adds none though it has one
            assert with_bos == case["ids_special"]
    assert tok.decode(rec["decode"]["ids"]) == rec["decode"]["text"]


@pytest.mark.parametrize(("name", "bos", "eos", "pad"), [
    ("llama3", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),  # no pad token: pad with eos
    ("qwen2", None, "<|im_end|>", "<|endoftext|>"),
    ("gpt2", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
])
def test_fixture_special_ids(name, bos, eos, pad):
    tok, raw = _fixture(name), tokenizers.Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos and raw.token_to_id(bos), raw.token_to_id(eos),
                                                    raw.token_to_id(pad))
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.encode("x", bos=True, eos=True) == ([tok.bos_id] if bos else []) + tok.encode("x") + [tok.eos_id]


@pytest.mark.parametrize(("name", "recorded_as"), [("llama3", "llama3"), ("qwen2", "qwen2"),
                                                    ("llama3_bf16", "llama3"), ("qwen3", "qwen2")])
def test_fixture_chats_match_transformers(name, recorded_as, recorded):
    """Prompts exactly as apply_chat_template; the answer up to the end of turn too, with weight on it alone
    (llama3_bf16 and qwen3 keep the template in chat_template.jinja, as transformers 5 saves it)."""
    tok = _fixture(name)
    for case in recorded[recorded_as]["chats"]:
        prompt, response = (m["content"] for m in case["messages"])
        ids, weights = chat.render(tok, prompt, response)
        assert chat.prompt_ids(tok, prompt) == case["prompt_ids"] == ids[:len(case["prompt_ids"])]
        end = case["full_ids"].index(tok.eos_id, len(case["prompt_ids"])) + 1
        assert ids[:end] == case["full_ids"][:end] and tok.decode(ids) == tok.decode(case["full_ids"])
        assert weights == [0.0] * len(case["prompt_ids"]) + [1.0] * (end - len(case["prompt_ids"])) + [0.0] * (
            len(ids) - end)
    if recorded_as == "qwen2":  # ChatML's newline after <|im_end|>: fed, never generated, so never a target
        assert ids[-1] == tok.encode("\n")[0] and weights[-2:] == [1.0, 0.0]


def test_fixture_without_template_uses_llmjax_layout():
    tok = _fixture("gpt2")
    assert tok.chat_template == CHAT_TEMPLATE
    ids, weights = chat.render(tok, "hi", "ok")
    assert ids == tok.encode("<|endoftext|><|user|>hi<|end|><|assistant|>ok<|endoftext|>")  # markers as text
    n = len(tok.encode("ok")) + 1
    assert weights == [0.0] * (len(ids) - n) + [1.0] * n and ids[-1] == tok.eos_id


def test_write_files_copies_a_folder_and_adds_a_missing_template(tmp_path):
    paths = write_files(f"hf:{FIXTURES / 'llama3'}", str(tmp_path / "llama3"))
    assert [Path(p).name for p in paths] == ["tokenizer.json", "tokenizer_config.json"]
    for p in paths:
        assert Path(p).read_bytes() == (FIXTURES / "llama3" / Path(p).name).read_bytes()
    write_files(f"hf:{FIXTURES / 'gpt2'}", str(tmp_path / "gpt2"))
    config = json.loads((tmp_path / "gpt2" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|endoftext|>"
    assert chat.render(get_tokenizer(f"hf:{tmp_path / 'gpt2'}"), "a", "b") == chat.render(_fixture("gpt2"), "a", "b")


# Hugging Face's loader on what write_files made: only where transformers is installed (the hf extra)


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5 and a list in 4."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _apply(auto, prompt: str, response: str) -> tuple[list[int], list[int]]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return (_ids(auto.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)),
            _ids(auto.apply_chat_template(messages, tokenize=True)))


def test_transformers_loads_the_export(exported):
    transformers = pytest.importorskip("transformers")
    native, _, out = exported
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (native.pad_id, native.bos_id, native.eos_id)
    for text in TEXTS:
        assert auto(text, add_special_tokens=False)["input_ids"] == native.encode(text), text
        assert auto(text)["input_ids"] == native.encode(text, bos=True), text  # as llmjax's text rows start
        ids = native.encode(text, bos=True, eos=True)
        assert auto.decode(ids, skip_special_tokens=True) == native.decode(ids)
    for prompt, response in (("add 12 + 345 = ", "357"), (" two  spaces\n", "日本 🙂"), ("x", "")):
        assert _apply(auto, prompt, response) == (chat.prompt_ids(native, prompt), chat.render(native, prompt,
                                                                                              response)[0])


def test_transformers_renders_the_added_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_files(f"hf:{FIXTURES / 'gpt2'}", str(tmp_path))
    auto, tok = transformers.AutoTokenizer.from_pretrained(tmp_path), get_tokenizer(f"hf:{tmp_path}")
    assert _apply(auto, "what is 12+7?", "19") == (chat.prompt_ids(tok, "what is 12+7?"),
                                                   chat.render(tok, "what is 12+7?", "19")[0])


# bad input: one line each, naming the file and the fix


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _folder(tmp_path: Path, **config) -> Path:
    """The byte tokenizer's export with tokenizer_config.json entries replaced (None deletes one)."""
    write_files("byte", str(tmp_path))
    path = tmp_path / "tokenizer_config.json"
    merged = json.loads(path.read_text()) | config
    path.write_text(json.dumps({k: v for k, v in merged.items() if v is not None}))
    return tmp_path


def test_missing_and_unreadable_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json; save the tokenizer with") as e:
        get_tokenizer(f"hf:{tmp_path}")
    assert str(tmp_path) in _one_line(e)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer.json that tokenizers .* reads") as e:
        get_tokenizer(f"hf:{tmp_path}")
    _one_line(e)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="upgrade tokenizers") as e:
        get_tokenizer(f"hf:{tmp_path}")
    _one_line(e)


def test_special_token_problems(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer_config.json names no eos_token; add \"eos_token\"") as e:
        HFTokenizer(str(_folder(tmp_path / "a", eos_token=None)))
    _one_line(e)
    with pytest.raises(ValueError, match="eos_token '<nope>' is not a token of tokenizer.json") as e:
        HFTokenizer(str(_folder(tmp_path / "b", eos_token={"content": "<nope>", "special": True})))
    _one_line(e)
    (tmp_path / "a" / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<s>"}}))
    assert HFTokenizer(str(tmp_path / "a")).eos_id == 1  # the older file fills in what tokenizer_config lacks
    (tmp_path / "bad").mkdir()
    shutil.copy(tmp_path / "a" / "tokenizer.json", tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer_config.json").write_text("{eos")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON") as e:
        HFTokenizer(str(tmp_path / "bad"))
    _one_line(e)


def test_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ eos_token }}"}]
    assert HFTokenizer(str(_folder(tmp_path / "a", chat_template=named))).chat_template == "{{ eos_token }}"
    with pytest.raises(ValueError, match=r"\['tool_use'\] but none named 'default'") as e:
        HFTokenizer(str(_folder(tmp_path / "b", chat_template=named[:1])))
    _one_line(e)
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ bos_token }}")  # what transformers 5 writes wins
    assert HFTokenizer(str(tmp_path / "a")).chat_template == "{{ bos_token }}"


def test_unconvertible_names_and_models(tmp_path, trained):
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
        write_files("gpt2", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    proto = hf_tokenizer.spm_pb2.ModelProto.FromString(Path(trained["bpe"]).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "prefix.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="only models made by python -m llmjax.data.tokenizer train") as e:
        write_files(str(tmp_path / "prefix.model"), str(tmp_path / "out"))
    _one_line(e)
