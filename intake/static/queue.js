// The staff queue, kept current and worked from the keyboard. Everything here is a shortcut:
// without this script every row is a link, every action a form button.
//
// - Every few seconds ask for the queue's fingerprint (no patient data) and fetch the page
//   again only when it changed; swap in its rows, counts and pager.
// - Requests that arrive while the page is open are highlighted, counted in the tab title and
//   announced once, until the person has moved onto them.
// - j / k move the selection (the focus goes to the row's link, so Enter opens it), c claims
//   the selected request, x ticks it for the bulk actions, ? shows the shortcuts.
(function () {
  "use strict";
  var table = document.getElementById("queue");
  if (!table) { return; }
  var body = document.getElementById("queue-rows");
  var bulkForm = document.getElementById("bulk-form");
  var news = document.getElementById("queue-news");
  var help = document.getElementById("queue-help");
  var helpButton = document.getElementById("queue-help-button");
  var versionUrl = table.getAttribute("data-version-url");
  var pageUrl = table.getAttribute("data-rows-url");
  // The version of the rows the server rendered: a change made before the first poll shows too.
  var current = table.getAttribute("data-version") || null;
  var baseTitle = document.title;
  var EVERY_MS = 5000;

  var known = {};     // references seen on this page since it loaded
  var unseen = {};    // references that arrived since, not yet moved onto
  var selected = null;

  function rows() {
    return Array.prototype.slice.call(body.querySelectorAll("tr[data-reference]"));
  }
  function referenceOf(row) { return row.getAttribute("data-reference"); }
  function rowFor(reference) {
    var all = rows();
    for (var i = 0; i < all.length; i += 1) {
      if (referenceOf(all[i]) === reference) { return all[i]; }
    }
    return null;
  }
  function linkOf(row) { return row.querySelector(".queue__reference a"); }

  rows().forEach(function (row) { known[referenceOf(row)] = true; });

  // -- new requests ------------------------------------------------------------------------

  function unseenCount() { return Object.keys(unseen).length; }

  function showNews() {
    var count = unseenCount();
    document.title = count ? "(" + count + " new) " + baseTitle : baseTitle;
    rows().forEach(function (row) {
      var isNew = Object.prototype.hasOwnProperty.call(unseen, referenceOf(row));
      row.classList.toggle("is-new", isNew);
      var marker = row.querySelector(".badge--new");
      if (isNew && !marker) {
        marker = document.createElement("span");
        marker.className = "badge badge--new";
        marker.textContent = "new";
        row.querySelector(".queue__reference").appendChild(marker);
      } else if (!isNew && marker) {
        marker.parentNode.removeChild(marker);
      }
    });
  }

  function seen(reference) {
    if (Object.prototype.hasOwnProperty.call(unseen, reference)) {
      delete unseen[reference];
      showNews();
    }
  }

  // -- selection ---------------------------------------------------------------------------

  function select(row, focus) {
    rows().forEach(function (other) { other.classList.remove("is-selected"); });
    if (!row) { selected = null; return; }
    row.classList.add("is-selected");
    selected = referenceOf(row);
    seen(selected);
    if (focus) {
      var link = linkOf(row);
      if (link) { link.focus(); }
      row.scrollIntoView({ block: "nearest" });
    }
  }

  function move(step) {
    var all = rows();
    if (!all.length) { return; }
    var at = selected ? all.indexOf(rowFor(selected)) : -1;
    var next = at < 0 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, at + step));
    select(all[next], true);
  }

  // The skip link lands on the first request's link, selected, as "j" would.
  var skip = document.querySelector('a[href="#first-request"]');
  if (skip) {
    skip.addEventListener("click", function (event) {
      var first = rows()[0];
      if (!first) { return; }
      event.preventDefault();
      select(first, true);
    });
  }

  body.addEventListener("focusin", function (event) {
    var row = event.target.closest ? event.target.closest("tr[data-reference]") : null;
    if (row) { select(row, false); }
  });

  // -- actions -----------------------------------------------------------------------------

  function claim(reference) {
    // A real form POST, with the page's CSRF token and filters: the server answers as it does
    // for the Claim button, and the page comes back with the claim in it.
    var form = document.createElement("form");
    form.method = "post";
    form.action = bulkForm.getAttribute("action");
    form.hidden = true;
    var fields = [["reference", reference], ["action", "claim"]];
    Array.prototype.forEach.call(bulkForm.querySelectorAll("input[type=hidden]"), function (input) {
      if (input.name === "csrf_token" || input.name.indexOf("back_") === 0) {
        fields.push([input.name, input.value]);
      }
    });
    fields.forEach(function (pair) {
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = pair[0];
      input.value = pair[1];
      form.appendChild(input);
    });
    document.body.appendChild(form);
    form.submit();
  }

  function toggleTick(row) {
    var box = row.querySelector("input[type=checkbox]");
    if (box) { box.checked = !box.checked; }
  }

  function showHelp() {
    if (help && typeof help.showModal === "function" && !help.open) { help.showModal(); }
  }
  if (helpButton && help && typeof help.showModal === "function") {
    helpButton.hidden = false;
    helpButton.addEventListener("click", showHelp);
  }

  function typing(target) {
    if (!target || !target.tagName) { return false; }
    var tag = target.tagName.toLowerCase();
    if (tag === "textarea" || tag === "select" || target.isContentEditable) { return true; }
    return tag === "input" && target.type !== "checkbox";
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    if (help && help.open) { return; }
    var row = selected ? rowFor(selected) : null;
    switch (event.key) {
      case "j": move(1); break;
      case "k": move(-1); break;
      case "c": if (row) { claim(selected); } break;
      case "x": if (row) { toggleTick(row); } break;
      case "?": showHelp(); break;
      case "Enter":
        // The focused link opens itself; this is for a selection whose focus moved away.
        if (row && event.target === document.body && linkOf(row)) { linkOf(row).click(); break; }
        return;
      default: return;
    }
    event.preventDefault();
  });

  // -- refreshing --------------------------------------------------------------------------

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    var freshBody = fresh.getElementById("queue-rows");
    if (!freshBody) { throw new Error("not the queue"); }
    var ticked = {};
    Array.prototype.forEach.call(body.querySelectorAll("input[type=checkbox]:checked"), function (box) {
      ticked[box.value] = true;
    });
    var hadFocus = body.contains(document.activeElement);
    body.innerHTML = freshBody.innerHTML;
    ["queue-counts"].forEach(function (id) {
      var mine = document.getElementById(id);
      var theirs = fresh.getElementById(id);
      if (mine && theirs) { mine.innerHTML = theirs.innerHTML; }
    });
    var arrived = 0;
    rows().forEach(function (row) {
      var reference = referenceOf(row);
      if (!known[reference]) { known[reference] = true; unseen[reference] = true; arrived += 1; }
      var box = row.querySelector("input[type=checkbox]");
      if (box && ticked[box.value]) { box.checked = true; }
    });
    var row = selected ? rowFor(selected) : null;
    if (row) { select(row, hadFocus); } else { selected = null; }
    showNews();
    if (arrived && news) {
      news.textContent = arrived === 1 ? "1 new request arrived." : arrived + " new requests arrived.";
    }
  }

  function refreshRows() {
    return fetch(pageUrl, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("queue unavailable"); }
        return response.text();
      })
      .then(swap);
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
  if (window.fetch && window.DOMParser) { window.setTimeout(check, EVERY_MS); }
}());
