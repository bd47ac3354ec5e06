"""Property tests of the validators in target/validate.py: every value either passes unchanged (or in its canonical
form) or is refused with a ValueError whose message says what is wrong; no other exception ever escapes."""

from __future__ import annotations

import string
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from target import validate

SAFE_FIRST = string.ascii_letters + string.digits
SAFE_REST = SAFE_FIRST + "._:-"

good_names = st.builds(lambda a, b: a + b, st.sampled_from(SAFE_FIRST),
                       st.text(SAFE_REST, max_size=63).filter(lambda t: ".." not in t))

# the ways a name can try to leave its directory or confuse the kernel or a reader
EVIL_PIECES = ["..", "/", "\\", "\x00", "\n", "\r", "\t", " ", "\u202e", "\u200b", "\uff0f", "\u2215", "\u00a0",
               "%2f", "\ufeff", "é", "\U0001f4a9", "$(x)", "`x`", ";", "*", "?", "'", '"']


@st.composite
def evil_names(draw: st.DrawFn) -> str:
    """A plausible name with something harmful put somewhere in it, or a name that breaks a simple rule."""
    kind = draw(st.sampled_from(["inject", "lead", "empty", "long", "dotted", "unicode"]))
    base = draw(good_names)
    if kind == "inject":
        pos = draw(st.integers(0, len(base)))
        return base[:pos] + draw(st.sampled_from(EVIL_PIECES)) + base[pos:]
    if kind == "lead":
        return draw(st.sampled_from([".", "-", "_", ":"])) + base
    if kind == "empty":
        return ""
    if kind == "long":
        return base + "a" * (65 - len(base)) + draw(st.text(SAFE_REST, max_size=20))
    if kind == "dotted":
        return draw(st.sampled_from(["..", ".", "../" + base, base + "/..", "./" + base]))
    return base + draw(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)))


def refused(fn, value: object, *args: object) -> str:
    """The validator's message for a refused value; fails the test on any other outcome."""
    with pytest.raises(ValueError) as exc:
        fn(value, *args)
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


@given(good_names)
def test_good_names_pass_unchanged(name: str) -> None:
    assert validate.safe_name(name, "disk name") == name


@given(evil_names())
@example("abc\n")  # `$` in a regex also matches before a final newline
@example("a" * 65)
@example("..")
def test_bad_names_are_refused_with_the_field_named(name: str) -> None:
    assert "disk name" in refused(validate.safe_name, name, "disk name")


@given(st.text())
def test_any_text_is_a_name_or_refused(text: str) -> None:
    try:
        assert validate.safe_name(text) == text
    except ValueError as exc:
        assert str(exc)
        return
    assert text.isascii() and text.isprintable() and "/" not in text and ".." not in text
    assert not text.startswith((".", "-", "_", ":"))
    assert 0 < len(text) <= 64


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_non_strings_are_refused(value: object) -> None:
    refused(validate.safe_name, value)
    refused(validate.nqn, value)
    refused(validate.dhchap_key, value)
    refused(validate.device_path, value)
    refused(validate.uuid_str, value)
    refused(validate.tcp_port, value)


@given(st.sampled_from(["\ud800", "a\udfff", "nqn.2026-11.io.nvmetd:\udc00"]))
def test_lone_surrogates_from_json_are_refused_clearly(value: str) -> None:
    """json.loads accepts "\\ud800"; it must not surface as a codec error."""
    for fn in (validate.safe_name, validate.nqn, validate.device_path):
        assert "surrogate" in refused(fn, value) or "may only use" in refused(fn, value)


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.integers(1970, 2099), st.integers(1, 12), st.lists(labels, min_size=1, max_size=4),
       st.text(string.ascii_letters + string.digits + ".:-_", min_size=1, max_size=40))
def test_good_nqns_pass(year: int, month: int, domain: list[str], suffix: str) -> None:
    value = f"nqn.{year}-{month:02d}.{'.'.join(domain)}:{suffix}"
    assert validate.nqn(value) == value


@given(st.uuids())
def test_uuid_nqns_pass_in_canonical_form_only(u: uuid.UUID) -> None:
    value = f"nqn.2014-08.org.nvmexpress:uuid:{u}"
    assert validate.nqn(value) == value
    for variant in (f"{{{u}}}", u.hex, f"urn:uuid:{u}"):
        refused(validate.nqn, f"nqn.2014-08.org.nvmexpress:uuid:{variant}")


@given(st.text(max_size=300))
@example("nqn.2026-11.io.nvmetd:a\n")
@example("nqn.2026-11.io.nvmetd\n")
@example("nqn.2026-11.io.nvmetd:../../etc")
@example("nqn.\u0662\u0660\u0662\u0666-11.io.nvmetd:x")  # Arabic-Indic digits match a unicode `\\d`
def test_any_text_is_an_nqn_or_refused(text: str) -> None:
    try:
        assert validate.nqn(text) == text
    except ValueError as exc:
        assert str(exc)
        return
    assert text.isprintable() and "/" not in text and len(text.encode()) <= validate.NQN_MAX_BYTES
    assert text == validate.DISCOVERY_NQN or text[4:8].isascii()


@given(st.text(max_size=40))
def test_uuid_str_canonical_or_refused(text: str) -> None:
    try:
        out = validate.uuid_str(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert out == str(uuid.UUID(out))


@given(st.text(max_size=8))
@example("\u0661\u0662")  # Arabic-Indic digits are str.isdigit()
@example("\u00b2")  # so is superscript two, which int() refuses
@example("80\n")
def test_tcp_port_is_ascii_digits_in_range(text: str) -> None:
    try:
        out = validate.tcp_port(text)
    except ValueError as exc:
        assert "port" in str(exc)
        return
    assert text.isascii() and text.isdigit() and 1 <= int(text) <= 65535 and out == str(int(text))


@given(st.binary(min_size=32, max_size=32) | st.binary(min_size=48, max_size=48) | st.binary(min_size=64,
                                                                                          max_size=64))
def test_minted_dhchap_keys_round_trip(secret: bytes) -> None:
    hmac_id = {32: 1, 48: 2, 64: 3}[len(secret)]
    key = validate.make_dhchap_key(secret, hmac_id)
    assert validate.dhchap_key(key) == key
    refused(validate.dhchap_key, key + "\n")
    refused(validate.dhchap_key, key[:-1])


@given(st.text(max_size=120))
def test_any_text_is_a_dhchap_key_or_refused(text: str) -> None:
    try:
        validate.dhchap_key(text)
    except ValueError as exc:
        assert str(exc)


@given(st.text(max_size=60))
@example("/dev/../etc/shadow")
@example("/dev/sda\x00")
def test_device_paths_absolute_without_dotdot(text: str) -> None:
    try:
        out = validate.device_path(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert out.startswith("/") and ".." not in out.split("/") and "\x00" not in out


@given(st.text(max_size=45), st.sampled_from(["ipv4", "ipv6"]))
@settings(max_examples=200)
def test_ip_for_family_or_refused(text: str, family: str) -> None:
    try:
        validate.ip_for_family(text, family)
    except ValueError as exc:
        assert str(exc)
