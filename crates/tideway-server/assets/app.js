// Tideway dashboard behaviours that need a script (served from the binary; no inline scripts,
// so the Content-Security-Policy can forbid them):
// - "select all" boxes tick or clear every checkbox of their group.
document.addEventListener("change", function (event) {
  var target = event.target;
  if (target.matches("input[data-select-all]")) {
    var group = document.querySelectorAll(
      'input[type=checkbox][data-group="' + target.getAttribute("data-select-all") + '"]'
    );
    group.forEach(function (box) { box.checked = target.checked; });
  }
});
