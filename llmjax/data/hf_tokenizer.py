"""Hugging Face tokenizers in llmjax, and llmjax's tokenizers as Hugging Face tokenizer files.

`get_tokenizer("hf:DIR")` loads a folder saved by transformers' `save_pretrained`: tokenizer.json through the
`tokenizers` library (transformers is never imported), the special tokens named in tokenizer_config.json or
special_tokens_map.json, and the model's Jinja chat template, through which llmjax.data.chat renders prompts and
responses, so fine-tuning keeps the format the model was trained with.

`write_files(name, out_dir)` writes the tokenizer files of a Hugging Face export: an hf:DIR tokenizer's own files,
or, for "byte", "synthetic" and sentencepiece .model files, a tokenizer.json that tokenizes exactly as llmjax does
and a tokenizer_config.json whose chat template renders exactly chat.render's ids. One difference is the format's
own: there, text that spells a special token ("</s>", "<|end|>") encodes to that token, as in every Hugging Face
tokenizer (it is how chat templates mark turns), whereas llmjax's tokenizers spell such text out.
"""

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from llmjax.data.tokenizer import (
    _TRAIN_HINT,
    SPECIAL_TOKENS,
    SYNTHETIC_MODEL,
    ByteTokenizer,
    _check_ids,
    get_tokenizer,
)

# What save_pretrained writes; the last three are the slow tokenizers' files, copied so those load too.
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")

# llmjax's layout (see llmjax.data.chat) in Jinja, for folders without a template and for exported tokenizers,
# where the markers are special tokens; in other vocabularies they are plain text.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{%- if loop.first and bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}
{{ '<|user|>' + message['content'] + '<|end|>' }}
{%- elif message['role'] == 'assistant' -%}
{{ '<|assistant|>' + message['content'] + eos_token }}
{%- else -%}
{{ raise_exception("llmjax's chat template has user and assistant turns only, not " + message['role']) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"""

_PIECE = spm_pb2.ModelProto.SentencePiece
_SAVE_HINT = "save the tokenizer with transformers' save_pretrained"


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_SAVE_HINT}") from None


def _content(token: str | dict | None) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(folder: Path, config: dict) -> str | None:
    """The folder's template: chat_template.jinja (newer transformers) over tokenizer_config.json's, which is a
    string or a list of named templates of which "default" serves chat."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        if "default" not in named:
            raise ValueError(f"{folder / 'tokenizer_config.json'} has chat templates {sorted(named)} but none named "
                             "'default', the one chat rendering uses; name one of them 'default'")
        template = named["default"]
    return template


class HFTokenizer:
    """A Hugging Face tokenizer folder behind ByteTokenizer's interface.

    encode never adds the post-processor's specials: bos and eos are added on request only, as llmjax's data
    rendering decides. pad is the pad token, or eos when there is none (as Hugging Face's generate does); bos_id is
    None when the tokenizer has no bos (Qwen), and a bos request then adds nothing.
    """

    def __init__(self, path: str):
        folder = Path(path).expanduser()
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"Hugging Face tokenizer folder {path!r} has no tokenizer.json; {_SAVE_HINT} "
                                    "(a fast tokenizer) into it")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(f"{file} is not a tokenizer.json that tokenizers {tokenizers.__version__} reads "
                             f"({str(e).splitlines()[0]}); {_SAVE_HINT}, or upgrade tokenizers") from None
        config = _json(folder / "special_tokens_map.json") | _json(folder / "tokenizer_config.json")
        self.path = path
        self.special_tokens = {role: token for role in ROLES if (token := _content(config.get(role)))}
        if "eos_token" not in self.special_tokens:
            raise ValueError(f"{folder / 'tokenizer_config.json'} names no eos_token; add \"eos_token\": \"<the "
                             "end-of-text token>\" to it (generation stops at eos and chat training learns it)")
        ids = {role: self._id(folder, role, token) for role, token in self.special_tokens.items()}
        self.bos_id, self.eos_id = ids.get("bos_token"), ids["eos_token"]
        self.pad_id = ids.get("pad_token", self.eos_id)
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.chat_template = _chat_template(folder, config) or CHAT_TEMPLATE
        self.files = [str(folder / name) for name in FILES if (folder / name).is_file()]

    def _id(self, folder: Path, role: str, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: {role} {token!r} is not a token of tokenizer.json; "
                             f"{_SAVE_HINT} so the two files agree")
        return i

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + self._tok.encode(text, add_special_tokens=False).ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops special tokens, so a generated sequence decodes to its text alone."""
        return self._tok.decode(_check_ids(ids, self.vocab_size).tolist(), skip_special_tokens=True)


def _merges(scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges that replay sentencepiece's encoding: it merges, leftmost first, the adjacent pair whose
    concatenation is the highest-scoring piece, so every split of a piece into two pieces is a merge, ranked by
    that piece's score."""
    ranked = [(-score, a, b) for piece, score in scores.items() for k in range(1, len(piece))
              if (a := piece[:k]) in scores and (b := piece[k:]) in scores]
    return [(a, b) for _, a, b in sorted(ranked)]


def _isolate(chars: str) -> pre_tokenizers.Split:
    """Splits text at `chars`, characters the unigram vocabulary lacks.

    tokenizers' Unigram, unlike sentencepiece, matches text that spells a byte piece ("<0x41>") as that piece.
    Byte pieces are given a score below any six known characters, so that happens only where the spelling holds an
    unknown character, which costs more than any piece. Sentencepiece covers such a character on its own, so
    splitting there changes nothing else and takes the spellings apart.
    """
    return pre_tokenizers.Split(tokenizers.Regex(f"[{re.escape(chars)}]"), "isolated")


def _from_sentencepiece(path: str) -> tuple[tokenizers.Tokenizer, list[str], dict[str, int]]:
    """The model as a tokenizers BPE or Unigram over the same pieces at the same ids; its pieces; the special
    tokens' ids by role."""
    proto = spm_pb2.ModelProto.FromString(Path(path).read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if (norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces
            or not norm.escape_whitespaces or spec.treat_whitespace_as_suffix or not spec.byte_fallback):
        raise ValueError(f"{path!r} normalizes text in ways tokenizer.json would not reproduce exactly; only models "
                         f"made by {_TRAIN_HINT} (identity normalization, spaces kept, byte fallback) convert")
    kinds = {p.type for p in proto.pieces} - {_PIECE.NORMAL, _PIECE.UNKNOWN, _PIECE.CONTROL, _PIECE.BYTE}
    if kinds:
        raise ValueError(f"{path!r} has user-defined or unused pieces, which tokenizer.json would not treat as "
                         f"sentencepiece does; retrain it with {_TRAIN_HINT}")
    pieces = [p.piece for p in proto.pieces]
    scores = {p.piece: p.score for p in proto.pieces if p.type == _PIECE.NORMAL}
    if spec.model_type == spm_pb2.TrainerSpec.BPE:
        tok = tokenizers.Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=_merges(scores),
                                              unk_token=pieces[spec.unk_id], byte_fallback=True))
    else:  # unigram (train makes no other kind)
        byte_score = 6 * min(scores.values()) - 1  # see _isolate
        vocab = [(p.piece, byte_score if p.type == _PIECE.BYTE else p.score) for p in proto.pieces]
        tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=True))
        if unknown := "".join(c for c in "<>x0123456789ABCDEF" if c not in scores):
            tok.pre_tokenizer = _isolate(unknown)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                            if p.type in (_PIECE.CONTROL, _PIECE.UNKNOWN)])
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "pad_token": spec.pad_id, "unk_token": spec.unk_id}
    return tok, pieces, ids


def _from_bytes() -> tuple[tokenizers.Tokenizer, list[str], dict[str, int]]:
    """ByteTokenizer as a BPE without merges whose vocabulary is the specials and the 256 byte-fallback bytes, so
    every character falls back to its UTF-8 bytes; specials named as sentencepiece names them."""
    specials = ["<pad>", "<s>", "</s>", *SPECIAL_TOKENS[3:]]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    tok = tokenizers.Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False) for p in specials])
    return tok, pieces, {"bos_token": ByteTokenizer.bos_id, "eos_token": ByteTokenizer.eos_id,
                         "pad_token": ByteTokenizer.pad_id}


def _copy(source: HFTokenizer, out: Path) -> list[str]:
    """The folder's files; a folder without a chat template gets llmjax's, which models fine-tuned here used."""
    paths = [str(shutil.copyfile(file, out / Path(file).name)) for file in source.files]
    if source.chat_template == CHAT_TEMPLATE:
        config = out / "tokenizer_config.json"
        config.write_text(json.dumps(_json(config) | {"chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False),
                          encoding="utf-8")
        paths = sorted(set(paths) | {str(config)})
    return paths


def write_files(name: str, out_dir: str) -> list[str]:
    """Writes the Hugging Face tokenizer files of data.tokenizer `name` into out_dir; returns their paths.

    `AutoTokenizer.from_pretrained(out_dir)` and `get_tokenizer("hf:" + out_dir)` load them. For llmjax's own
    tokenizers, every special (pad, bos, eos, the chat markers, unk) is a special token at its id, the chat
    template is llmjax's, and the post-processor adds bos, as llmjax's text rows start (encode with
    add_special_tokens=False for the bare ids).
    """
    native = get_tokenizer(name)  # refuses unknown names, and models without llmjax's specials
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(native, HFTokenizer):
        return _copy(native, out)
    if isinstance(native, ByteTokenizer):
        tok, pieces, ids = _from_bytes()
    else:
        tok, pieces, ids = _from_sentencepiece(str(SYNTHETIC_MODEL) if name == "synthetic" else name)
    bos = pieces[ids["bos_token"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, ids["bos_token"])])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **{role: pieces[i] for role, i in ids.items()},
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return [str(out / "tokenizer.json"), str(out / "tokenizer_config.json")]
