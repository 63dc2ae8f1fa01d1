// Tideway dashboard behaviours that need a script (served from the binary; no inline scripts,
// so the Content-Security-Policy can forbid them):
// - "select all" boxes tick or clear every checkbox of their group, and show ticked when the
//   page comes back with their whole group ticked (a form sent back to be mended);
// - a form with `data-confirm` asks before it is sent (stopping, deleting: what cannot be undone);
// - a live preview refused because the session ended says so, instead of keeping a stale figure.
document.addEventListener("change", function (event) {
  var target = event.target;
  if (target.matches("input[data-select-all]")) {
    var group = document.querySelectorAll(
      'input[type=checkbox][data-group="' + target.getAttribute("data-select-all") + '"]'
    );
    group.forEach(function (box) { box.checked = target.checked; });
  }
});

document.addEventListener("submit", function (event) {
  var question = event.target.getAttribute && event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

document.addEventListener("htmx:responseError", function (event) {
  var target = event.detail && event.detail.target;
  var status = event.detail && event.detail.xhr ? event.detail.xhr.status : 0;
  if (!target) {
    return;
  }
  var why = status === 401
    ? "Your session has ended: sign in again in another tab, then change a field to refresh (what you typed here is kept)."
    : "Could not refresh (" + status + "); change a field to try again.";
  if (!target.querySelector("input, select, textarea, button")) {
    target.textContent = why;
    return;
  }
  // A part of the form itself (the segment builder): keep it, say why above it.
  var notice = document.createElement("p");
  notice.className = "notice error";
  notice.setAttribute("role", "alert");
  notice.textContent = why;
  target.parentNode.insertBefore(notice, target);
});

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input[data-select-all]").forEach(function (all) {
    var group = document.querySelectorAll(
      'input[type=checkbox][data-group="' + all.getAttribute("data-select-all") + '"]'
    );
    all.checked = group.length > 0 && Array.prototype.every.call(group, function (box) {
      return box.checked;
    });
  });
});
