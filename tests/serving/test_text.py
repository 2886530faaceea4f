"""Request schemas, the tokenizer adapter and the text assembler (UTF-8 safety, stop strings) — no HTTP."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from companion.serving import ChatCompletionRequest, Codec, CompletionRequest, EngineConfig, TextAssembler
from companion.serving.engine import REPLACEMENT
from companion.serving.schemas import APIError, check_max_tokens

from .conftest import tiny_model_and_tokenizer


def byte_decode(ids):
    """A byte-level 'tokenizer': one id per UTF-8 byte, so a Chinese character spans three tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def assemble(text: str, stop=()) -> tuple[list[str], str]:
    assembler = TextAssembler(byte_decode, stop)
    deltas = []
    for b in text.encode("utf-8"):
        deltas.append(assembler.add(b))
        if assembler.stopped:
            break
    deltas.append(assembler.flush())
    return deltas, "".join(deltas)


def expected_cut(text: str, stop) -> str:
    """Streaming semantics: the first prefix that contains a stop string, cut before its earliest hit."""
    for k in range(1, len(text) + 1):
        hits = [i for i in (text[:k].find(s) for s in stop) if i >= 0]
        if hits:
            return text[:min(hits)]
    return text


def test_never_emits_half_a_utf8_character():
    deltas, out = assemble("床前明月光")
    assert out == "床前明月光"
    assert all(REPLACEMENT not in d for d in deltas)
    assert deltas[:3] == ["", "", "床"]  # three bytes, one character, emitted only when complete


def test_stop_string_is_cut_and_a_partial_match_held_back():
    assembler = TextAssembler(lambda ids: "".join(chr(i) for i in ids), stop=("。\n",))
    assert [assembler.add(ord(c)) for c in "春眠。"] == ["春", "眠", ""]  # "。" may begin the stop string
    assert assembler.add(ord("\n")) == "" and assembler.stopped
    assert assembler.flush() == ""


def test_partial_match_that_does_not_complete_is_released():
    assembler = TextAssembler(lambda ids: "".join(chr(i) for i in ids), stop=("ab",))
    assert [assembler.add(ord(c)) for c in "xa"] == ["x", ""]
    assert assembler.add(ord("c")) == "ac"  # "ac" is no longer the start of "ab"
    assert assembler.flush() == ""


alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters=REPLACEMENT)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet, max_size=30), st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=4))
def test_assembled_text_is_the_text_cut_at_the_first_stop(text, stop):
    deltas, out = assemble(text, stop)
    assert out == expected_cut(text, stop)
    assert all(REPLACEMENT not in d for d in deltas)


def test_request_validation_names_the_bad_field():
    ok = CompletionRequest(model="m", prompt="春", stop=["a", "b"], temperature=0)
    assert ok.stop_strings == ("a", "b") and ok.prompt_text == "春"
    bad = [({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
           ({"n": 2}, "only n=1"), ({"stop": ["a"] * 5}, "at most 4"), ({"prompt": ["a", "b"]}, "one prompt"),
           ({"temperature": "0.5"}, "temperature"), ({"stream": "yes"}, "stream")]
    for fields, match in bad:
        with pytest.raises(ValidationError, match=match):
            CompletionRequest(**{"model": "m", "prompt": "春", **fields})
    with pytest.raises(ValidationError, match="role"):
        ChatCompletionRequest(model="m", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(ValidationError, match="messages"):
        ChatCompletionRequest(model="m", messages=[])
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3)
    assert chat.token_limit == 3


def test_server_limits():
    with pytest.raises(APIError, match="at most 8 on this server, got 9"):
        check_max_tokens(9, 8)
    check_max_tokens(8, 8)
    with pytest.raises(ValueError, match="queue_size must be >= 1, got 0"):
        EngineConfig(queue_size=0)


def test_codec_of_the_character_tokenizer():
    _, tokenizer = tiny_model_and_tokenizer()
    codec = Codec(tokenizer)
    eos = tokenizer.token_id("<eos>")
    assert codec.eos_ids == (eos,)
    assert codec.encode("春眠") == [eos, *tokenizer.encode("春眠")]  # <eos> starts every text, as in pretraining
    assert codec.chat([{"role": "user", "content": "春"}]) == [eos, tokenizer.token_id("<user>"),
                                                                *tokenizer.encode("春"),
                                                                tokenizer.token_id("<assistant>")]
    assert codec.encode("☃") == [eos, tokenizer.token_id("<unk>")]
    with pytest.raises(APIError, match="exactly one user message"):
        codec.chat([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])
    plain = Codec(type(tokenizer)(list("春眠"), ["<eos>"]))  # no chat markers: no chat template
    with pytest.raises(APIError, match="no chat template"):
        plain.chat([{"role": "user", "content": "春"}])
    with pytest.raises(APIError, match="not in the vocabulary"):  # and no <unk>: the prompt cannot be encoded
        plain.encode("☃")
