"""Finding a request by phone, or by last name and date of birth: exact matches only."""

from __future__ import annotations

import pytest

from tests.intake.staff.conftest import last_seq, queue_references


@pytest.fixture
def found(route, make_user, staff_login):
    maria = route("refill", location="main")  # Núñez-Ortiz, 1980-03-15, (202) 555-0143
    other = route(
        "refill",
        location="main",
        first_name="Tomasz",
        last_name="Wróblewski",
        date_of_birth="1971-12-02",
        phone="(202) 555-0188",
    )
    ana = staff_login(make_user("ana", teams=("refills-main",)))

    def search(**query: str) -> list[str]:
        response = ana.post("/staff/search", data=query)
        assert response.status_code == 200
        return queue_references(response.get_data(as_text=True))

    return maria, other, search, ana


def test_search_by_phone_in_any_format(found):
    maria, other, search, _ana = found

    assert search(phone="(202) 555-0143") == [maria]
    assert search(phone="202.555.0143") == [maria]
    assert search(phone="+1 202 555 0188") == [other]


def test_search_by_last_name_and_date_of_birth(found):
    maria, other, search, _ana = found

    assert search(last_name="Núñez-Ortiz", date_of_birth="1980-03-15") == [maria]
    # Staff type names the way they hear them: case and accents do not matter.
    assert search(last_name="nunez ortiz", date_of_birth="1980-03-15") == [maria]
    assert search(last_name="WROBLEWSKI", date_of_birth="1971-12-02") == [other]


def test_a_near_miss_finds_nothing(found):
    _maria, _other, search, _ana = found

    assert search(phone="(202) 555-0144") == []  # one digit off
    assert search(phone="(202) 555-0134") == []  # two digits swapped
    assert search(last_name="Núñez-Ortiz", date_of_birth="1980-03-16") == []  # another DOB
    assert search(last_name="Núñez", date_of_birth="1980-03-15") == []  # part of the name
    assert search(last_name="Wróblewski", date_of_birth="1980-03-15") == []  # another's DOB


def test_search_explains_what_it_needs(app, found):
    client = app.test_client()
    assert client.get("/staff/search?phone=2025550143").status_code == 302  # logged out
    ana = found[3]

    # A last name alone would match too many patients.
    alone = ana.post("/staff/search", data={"last_name": "Núñez-Ortiz"})
    bad_phone = ana.post("/staff/search", data={"phone": "12"})

    assert "search by reference, phone, or last name and date of birth" in alone.get_data(
        as_text=True
    )
    assert "found</h2>" not in alone.get_data(as_text=True)
    assert 'role="alert"' in bad_phone.get_data(as_text=True)
    assert "found</h2>" not in bad_phone.get_data(as_text=True)


def test_search_terms_never_travel_in_a_url(found, app):
    maria, _other, search, ana = found
    form = ana.get("/staff/search").get_data(as_text=True)
    assert 'method="post"' in form and 'name="csrf_token"' in form
    # A GET with terms in the query string searches nothing and records nothing.
    before = last_seq(app)
    listed = ana.get("/staff/search", query_string={"phone": "202-555-0143"})
    assert maria not in listed.get_data(as_text=True)
    assert last_seq(app) == before


def test_a_logged_out_search_keeps_only_the_path_for_after_login(app):
    anonymous = app.test_client()
    response = anonymous.get("/staff/search?phone=2025550143&last_name=Nunez")
    assert response.status_code == 302
    location = response.headers["Location"]
    assert "2025550143" not in location and "Nunez" not in location
    assert location.endswith("/staff/login?next=/staff/search")
