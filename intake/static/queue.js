// Keep the staff queue current without a full reload: every few seconds ask for the queue's
// fingerprint (no patient data) and fetch fresh rows only when it changed.
(function () {
  "use strict";
  var table = document.getElementById("queue");
  if (!table || !window.fetch) { return; }
  var body = document.getElementById("queue-rows");
  var versionUrl = table.getAttribute("data-version-url");
  var rowsUrl = table.getAttribute("data-rows-url");
  // The version of the rows the server rendered: a change made before the first poll shows too.
  var current = table.getAttribute("data-version") || null;
  var EVERY_MS = 5000;

  function refreshRows() {
    return fetch(rowsUrl, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("queue unavailable"); }
        return response.text();
      })
      .then(function (html) { body.innerHTML = html; });
  }

  function check() {
    fetch(versionUrl, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        // Logged out (idle, disabled, elsewhere): show the login page, not stale names.
        if (response.redirected) { window.location.reload(); throw new Error("logged out"); }
        if (!response.ok) { throw new Error("queue unavailable"); }
        return response.json();
      })
      .then(function (data) {
        if (current !== null && data.version !== current) { return refreshRows().then(function () { current = data.version; }); }
        current = data.version;
      })
      .catch(function () { /* logged out or offline: the next page load will tell */ })
      .then(function () { window.setTimeout(check, EVERY_MS); });
  }
  window.setTimeout(check, EVERY_MS);
}());
