// The dashboard's only script of its own (the CSP allows no inline script): ask before a
// plain form with data-confirm deletes something. htmx buttons use hx-confirm instead.
document.addEventListener("submit", function (event) {
  var message = event.target && event.target.dataset ? event.target.dataset.confirm : null;
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
});
