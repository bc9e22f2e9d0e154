"""Audit pages an officer can read: key: value details, plain action names, long rows folded."""

from __future__ import annotations

import re

from intake.audit.chain import record_event
from intake.extensions import db
from tests.intake.compliance.test_access_report import work_a_request

MANY = [f"R-{n:04d}-AAAA" for n in range(60)]


def rows_of(html: str, table_id: str) -> list[str]:
    body = html.split(f'id="{table_id}"')[1].split("</table>")[0]
    return re.findall(r"<tr data-action=.*?</tr>", body, flags=re.S)


def test_audit_and_user_pages_show_details_as_key_value_lines_not_json(
    app, patient, staff, officer_client
):
    reference, *_ = work_a_request(app, patient, staff)
    with app.app_context():  # a queue page listing sixty requests: a long row, folded
        record_event(
            db.session,
            actor="user:2",
            actor_role="staff",
            action="phi.viewed",
            details={"username": "alice", "view": "queue", "rows": 60, "references": MANY},
        )
        db.session.commit()
    for path, table in (
        ("/compliance/audit", "audit-events"),
        ("/compliance/users/alice", "user-events"),
    ):
        html = officer_client.get(path).get_data(as_text=True)
        rows = rows_of(html, table)
        assert rows
        for row in rows:
            assert "{&#34;" not in row and '{"' not in row, "no raw JSON in a row"
        assert re.search(r"<dt>break glass:</dt> <dd>(yes|no)</dd>", html)
        assert re.search(r"<dt>team:</dt> <dd>[\w-]+</dd>", html)
        # Plain action names beside the codes; the time in its own fixed-width column.
        assert (
            '<code>phi.viewed</code></td>\n    <td data-label="Action (plain)">PHI viewed<' in html
        )
        assert ">Queue page viewed<" in html
        assert re.search(r'<td class="col-time" data-label="Time \(UTC\)"><time', html)
        # The long row shows a few short lines, and the whole list only on demand.
        long_row = next(r for r in rows if "R-0059-AAAA" in r)
        shown = long_row.split("<details")[0]
        assert shown.count("<dt>") <= 3 and "R-0059-AAAA" not in shown
        assert '<details class="kv-more"><summary>All 3 details</summary>' in long_row
        assert "<script" not in html
    # The CSV keeps the exact JSON for machines.
    csv_text = officer_client.get("/compliance/audit.csv").get_data(as_text=True)
    assert '""references"":[""R-0000-AAAA""' in csv_text
    assert reference in csv_text
