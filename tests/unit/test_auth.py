"""API keys and viewer tokens: who gets in, who does not, and that rotation works."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core import protocol
from broker.edge.auth import ApiKeys, ViewerTokens, key_id, parse_keys
from broker.edge.errors import ApiError

NOW = 1_800_000_000.0


def status_of(call) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as e:
        call()
    return e.value.status


def test_api_keys_accept_any_configured_key_and_name_it_by_id() -> None:
    keys = ApiKeys(["old-key", "new-key"])
    assert keys.check("Bearer old-key") == key_id("old-key")
    assert keys.check("bearer new-key") == key_id("new-key")
    assert key_id("new-key") not in "new-key" and len(key_id("new-key")) == 8


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic new-key",
                                    "Bearer wrong", "Bearer new-key2", "new-key"])
def test_api_keys_refuse_everything_else_with_401(header: str | None) -> None:
    assert status_of(lambda: ApiKeys(["new-key"]).check(header)) == 401


def test_no_api_keys_means_auth_is_off() -> None:
    assert ApiKeys([]).check(None) is None


def test_keys_come_from_the_setting_and_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  # the new one\n")
    assert parse_keys(" a , b,,", str(path)) == ["a", "b", "file-key-1", "file-key-2"]


def test_a_token_opens_its_own_generation_until_it_expires() -> None:
    tokens = ViewerTokens(["signing-key"], ttl=60)
    gen, other = protocol.new_generation_id(), protocol.new_generation_id()
    token = tokens.issue(gen, now=NOW)
    tokens.check(token, gen, now=NOW + 59)
    assert status_of(lambda: tokens.check(token, other, now=NOW)) == 403
    assert status_of(lambda: tokens.check(token, gen, now=NOW + 61)) == 403
    assert status_of(lambda: tokens.check(None, gen, now=NOW)) == 401
    assert status_of(lambda: tokens.check("", gen, now=NOW)) == 401


def test_rotation_old_tokens_verify_while_the_old_key_is_listed() -> None:
    gen = protocol.new_generation_id()
    old_token = ViewerTokens(["k1"], ttl=60).issue(gen, now=NOW)
    rotated = ViewerTokens(["k2", "k1"], ttl=60)  # k2 signs now; k1 still verifies
    rotated.check(old_token, gen, now=NOW)
    rotated.check(rotated.issue(gen, now=NOW), gen, now=NOW)
    retired = ViewerTokens(["k2"], ttl=60)
    assert status_of(lambda: retired.check(old_token, gen, now=NOW)) == 403


def test_a_token_names_no_secret_and_is_url_safe() -> None:
    token = ViewerTokens(["signing-key"], ttl=60).issue(protocol.new_generation_id(), now=NOW)
    assert "signing-key" not in token
    assert all(c.isalnum() or c in "-_." for c in token)


@given(st.text(max_size=200))
def test_no_forged_token_passes(forged: str) -> None:
    gen = protocol.new_generation_id()
    tokens = ViewerTokens(["signing-key"], ttl=60)
    if forged == tokens.issue(gen, now=NOW):
        return
    assert status_of(lambda: tokens.check(forged, gen, now=NOW)) in (401, 403)


@given(st.integers(min_value=0, max_value=10**12), st.text(max_size=60))
def test_tampering_with_the_expiry_breaks_the_signature(expiry: int, signature: str) -> None:
    gen = protocol.new_generation_id()
    tokens = ViewerTokens(["signing-key"], ttl=60)
    kid, real_expiry, real_signature = tokens.issue(gen, now=NOW).split(".")
    if str(expiry) == real_expiry and signature == real_signature:
        return
    forged = f"{kid}.{expiry}.{signature or real_signature}"
    if forged == f"{kid}.{real_expiry}.{real_signature}":
        return
    assert status_of(lambda: tokens.check(forged, gen, now=NOW)) == 403
