"""Sealing PHI: round trips, and every kind of tampering fails loudly."""

from __future__ import annotations

import pytest

from intake.crypto import phi

DOC = {"first_name": "Ana", "last_name": "Núñez", "date_of_birth": "1970-01-02", "rx": ["123456"]}


@pytest.fixture
def ring() -> phi.Keyring:
    return phi.Keyring.generate()


def test_round_trip(ring):
    sealed = phi.seal_phi(ring, "row-1", DOC)
    assert phi.open_phi(ring, "row-1", sealed) == DOC
    assert b"Ana" not in sealed.ciphertext and b"Ana" not in sealed.wrapped_key.blob


def test_each_seal_uses_a_fresh_data_key_and_nonce(ring):
    one, two = phi.seal_phi(ring, "row-1", DOC), phi.seal_phi(ring, "row-1", DOC)
    assert one.ciphertext != two.ciphertext
    assert one.wrapped_key.blob != two.wrapped_key.blob


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_a_bit_flip_anywhere_in_the_ciphertext_fails(ring):
    sealed = phi.seal_phi(ring, "row-1", DOC)
    for index in range(len(sealed.ciphertext)):
        broken = phi.SealedPHI(sealed.wrapped_key, _flip(sealed.ciphertext, index))
        with pytest.raises(phi.TamperedError):
            phi.open_phi(ring, "row-1", broken)


def test_a_bit_flip_anywhere_in_the_wrapped_key_fails(ring):
    sealed = phi.seal_phi(ring, "row-1", DOC)
    blob = sealed.wrapped_key.blob
    for index in range(len(blob)):
        broken = phi.SealedPHI(
            phi.WrappedKey(sealed.wrapped_key.kek_id, _flip(blob, index)), sealed.ciphertext
        )
        with pytest.raises(phi.TamperedError):
            phi.open_phi(ring, "row-1", broken)


def test_a_ciphertext_moved_to_another_row_fails(ring):
    sealed = phi.seal_phi(ring, "row-1", DOC)
    with pytest.raises(phi.TamperedError):
        phi.open_phi(ring, "row-2", sealed)


def test_a_ciphertext_swapped_between_rows_under_the_same_data_key_fails(ring):
    data_key = phi.AESGCM.generate_key(bit_length=256)
    sealed = phi.seal(data_key, "row-1", "phi", DOC)
    with pytest.raises(phi.TamperedError):
        phi.open_sealed(data_key, "row-2", "phi", sealed)


def test_a_ciphertext_opened_for_another_purpose_fails(ring):
    data_key = phi.AESGCM.generate_key(bit_length=256)
    note = phi.seal(data_key, "row-1", "note:1", {"text": "x"})
    with pytest.raises(phi.TamperedError):
        phi.open_sealed(data_key, "row-1", "phi", note)


def test_an_unknown_key_id_fails(ring):
    sealed = phi.seal_phi(ring, "row-1", DOC)
    renamed = phi.SealedPHI(phi.WrappedKey("k99", sealed.wrapped_key.blob), sealed.ciphertext)
    with pytest.raises(phi.UnknownKeyError):
        phi.open_phi(ring, "row-1", renamed)
    with pytest.raises(phi.UnknownKeyError):
        phi.open_phi(
            phi.Keyring.generate().with_new_primary(),
            "row-1",
            phi.SealedPHI(phi.WrappedKey("k7", b"x" * 60), sealed.ciphertext),
        )


def test_a_different_keyring_cannot_open(ring):
    sealed = phi.seal_phi(ring, "row-1", DOC)
    with pytest.raises(phi.TamperedError):
        phi.open_phi(phi.Keyring.generate(), "row-1", sealed)


def test_rotation_keeps_old_rows_readable_and_seals_new_ones_with_the_new_key(ring):
    old = phi.seal_phi(ring, "row-1", DOC)
    rotated = ring.with_new_primary()
    assert rotated.primary == "k2" and set(rotated.keks) == {"k1", "k2"}
    assert phi.open_phi(rotated, "row-1", old) == DOC
    assert phi.seal_phi(rotated, "row-2", DOC).wrapped_key.kek_id == "k2"


def test_keyring_json_round_trip_and_bad_documents(ring):
    assert phi.Keyring.from_json(ring.to_json()) == ring
    for bad in (
        "not json",
        "{}",
        '{"primary": "k1", "keks": {"k1": "c2hvcnQ="}}',
        '{"primary": "k2", "keks": {}}',
    ):
        with pytest.raises(phi.KeyringError):
            phi.Keyring.from_json(bad)


def test_blind_index_is_equal_for_equal_normalized_input(ring):
    assert phi.email_index(ring, " Maria@Example.COM ") == phi.email_index(
        ring, "maria@example.com"
    )
    assert phi.name_dob_index(ring, "Núñez-Ortiz", "1980-03-15") == phi.name_dob_index(
        ring, "nunez ortiz", "1980-03-15"
    )
    assert phi.phone_index(ring, "+12025550143") == phi.phone_index(ring, "+12025550143")


def test_blind_index_differs_for_other_values_fields_and_keys(ring):
    other = phi.Keyring.generate()
    assert phi.phone_index(ring, "+12025550143") != phi.phone_index(ring, "+12025550144")
    assert phi.phone_index(ring, "+12025550143") != phi.phone_index(other, "+12025550143")
    assert phi.name_dob_index(ring, "Nunez", "1980-03-15") != phi.name_dob_index(
        ring, "Nunez", "1980-03-16"
    )
    assert phi.blind_index(ring, "phone", "x") != phi.blind_index(ring, "email", "x")


def test_ip_pseudonym_is_stable_and_reveals_nothing(ring):
    assert phi.ip_pseudonym(ring, "203.0.113.9") == phi.ip_pseudonym(ring, "203.0.113.9")
    assert "203.0.113.9" not in (phi.ip_pseudonym(ring, "203.0.113.9") or "")
    assert phi.ip_pseudonym(ring, None) is None
