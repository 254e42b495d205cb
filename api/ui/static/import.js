// The suppression page's CSV import with progress: the file is sent by XMLHttpRequest so
// the upload's progress shows in #import-progress, then "importing" until the server's
// page (the counts and each bad line's error) replaces this one. Without JavaScript the
// form posts as usual.
(function () {
  "use strict";
  function bind() {
    var form = document.getElementById("import");
    var bar = document.getElementById("import-progress");
    var label = document.getElementById("import-status");
    if (!form || !bar || typeof XMLHttpRequest === "undefined") { return; }
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      bar.hidden = false;
      bar.value = 0;
      label.textContent = "uploading";
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) {
          bar.value = Math.round(100 * e.loaded / e.total);
          label.textContent = "uploading " + bar.value + " %";
        }
      });
      xhr.upload.addEventListener("load", function () {
        bar.value = 100;
        label.textContent = "importing";
        window.relaylabImport = {uploaded: bar.value};  // kept when the page is replaced
      });
      xhr.addEventListener("load", function () {
        document.open();
        document.write(xhr.responseText);
        document.close();
      });
      xhr.addEventListener("error", function () {
        label.textContent = "the upload failed: try again";
      });
      xhr.send(new FormData(form));
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", bind);
  } else { bind(); }
})();
