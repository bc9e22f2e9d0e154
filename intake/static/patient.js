// Patient pages, small enhancements; every page works without them.
// - The delivery address shows only when delivery or shipping is chosen (without this script
//   it is always shown, with its hint "Required for delivery or shipping").
// - The error summary's links move focus to their field and bring its label into view.
// - Print buttons (hidden until this script can make them work).
(function () {
  "use strict";

  function toggleByChoice(group) {
    var wanted = (group.getAttribute("data-shown-for-fulfillment") || "").split(" ");
    var radios = document.querySelectorAll("input[type=radio][name=fulfillment]");
    if (!radios.length) { return; }
    function update() {
      var chosen = document.querySelector("input[type=radio][name=fulfillment]:checked");
      var show = !!chosen && wanted.indexOf(chosen.value) !== -1;
      // A field with an error stays visible so the patient can see what to fix.
      var hasError = !!group.querySelector(".field--error");
      group.hidden = !(show || hasError);
    }
    for (var i = 0; i < radios.length; i++) {
      radios[i].addEventListener("change", update);
    }
    update();
  }

  function focusFromSummary(summary) {
    summary.addEventListener("click", function (event) {
      var link = event.target.closest ? event.target.closest("a[href^='#']") : null;
      if (!link) { return; }
      var target = document.getElementById(link.getAttribute("href").slice(1));
      if (!target) { return; }
      event.preventDefault();
      var group = target.closest("[hidden]");
      if (group) { group.hidden = false; }
      var box = target.closest(".field") || target;
      box.scrollIntoView({ block: "start" });
      target.focus({ preventScroll: true });
    });
  }

  function enablePrint(button) {
    button.hidden = false;
    button.addEventListener("click", function () { window.print(); });
  }

  var groups = document.querySelectorAll("[data-shown-for-fulfillment]");
  for (var g = 0; g < groups.length; g++) { toggleByChoice(groups[g]); }
  var summary = document.getElementById("error-summary");
  if (summary) { focusFromSummary(summary); }
  var printButtons = document.querySelectorAll("button[data-print]");
  for (var p = 0; p < printButtons.length; p++) { enablePrint(printButtons[p]); }
})();
