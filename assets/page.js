() => {
  // Keyboard and screen-reader help for the page (run once by demo.load, after ui.js).
  // Esc stops a streaming answer (#stop); Ctrl/Cmd+Shift+O starts a new chat (#new-chat).
  // Enter sends and Shift+Enter breaks the line: Gradio's message box does that itself.
  if (window.omniPage) return;
  const click = (sel) => { const el = document.querySelector(sel); if (el) el.click(); return !!el; };
  const typingElsewhere = (el) => el && el.matches && el.matches("input, textarea, select, [contenteditable]")
    && !el.closest("#input");
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !e.defaultPrevented && !typingElsewhere(e.target)
        && !document.querySelector("dialog[open], #chat .image-preview")) {  // (Esc closes those)
      click("#stop");
    } else if ((e.ctrlKey || e.metaKey) && e.shiftKey && !e.altKey && e.code === "KeyO") {
      e.preventDefault();
      if (click("#new-chat")) {
        const box = document.querySelector("#input textarea");
        if (box) box.focus();
      }
    }
  });

  // The server writes an answer's `$x$` as `\(x\)` for the page's math renderer (app/ui_page.py);
  // an answer's copy button gives the `$x$` back (code left as it is).
  const dollars = (text) => text.split(/(```[\s\S]*?(?:```|$)|`+[^`\n]*`+)/).map((part, i) => i % 2 ? part
    : part.replace(/\\\(((?:\\[^)]|[^\\\n])+?)\\\)/g, (_, math) => `$${math}$`)).join("");
  let copying = 0;
  const answerCopy = "#chat .message-buttons-left button[aria-label='Copy message']";
  document.addEventListener("click", (e) => {
    if (e.target.closest && e.target.closest(answerCopy)) copying = Date.now();
  }, true);
  if (navigator.clipboard && navigator.clipboard.writeText) {
    const write = navigator.clipboard.writeText.bind(navigator.clipboard);
    navigator.clipboard.writeText = (text) => {
      const answer = Date.now() - copying < 1000;
      copying = 0;
      return write(answer && typeof text === "string" ? dollars(text) : text);
    };
  }

  // Names for controls Gradio leaves unnamed or names generically; redone whenever Gradio redraws.
  const names = {
    "#new-chat": ["New chat (Ctrl+Shift+O)", null],
    "#stop": ["Stop the answer (Esc)", null],
    "#input textarea": [null, "Message"],
    "#conversations": [null, "Conversations"],
  };
  const label = () => {
    for (const [sel, [title, aria]] of Object.entries(names)) {
      for (const el of document.querySelectorAll(sel)) {
        if (title && el.title !== title) el.title = title;
        if (aria && el.getAttribute("aria-label") !== aria) el.setAttribute("aria-label", aria);
      }
    }
    // Gradio's empty-panel placeholder: an icon labelled "Empty value" on a div with no role
    for (const el of document.querySelectorAll("div.empty[aria-label]:not([role])")) el.setAttribute("role", "img");
    // a file attached to the message box: a "listitem" beside the upload button, in no list
    for (const el of document.querySelectorAll("#input .thumbnail-wrapper[role=listitem]")) {
      el.setAttribute("role", "group");
      el.setAttribute("aria-label", "Attached file");
    }
    // a toast's header is a role=button (it folds the toast) holding the Close button: only Close stays
    for (const el of document.querySelectorAll(".toast-header[role=button]")) {
      el.removeAttribute("role");
      el.removeAttribute("tabindex");
    }
    // a picture in the chat is a button around an image with an empty alt
    for (const el of document.querySelectorAll("#chat .image-container > button:not([aria-label])")) {
      el.setAttribute("aria-label", "Picture");
    }
    // a table in an answer scrolls sideways on a phone (ui.css): reachable by keyboard too
    for (const el of document.querySelectorAll("#chat .md table:not([tabindex])")) el.tabIndex = 0;
  };
  let queued = false;
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; label(); });
  }).observe(document.body, { childList: true, subtree: true });
  label();
  window.omniPage = { label };
}
