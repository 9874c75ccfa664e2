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
        && !document.querySelector("dialog[open], .lightbox, .image-preview")) {
      click("#stop");
    } else if ((e.ctrlKey || e.metaKey) && e.shiftKey && !e.altKey && e.code === "KeyO") {
      e.preventDefault();
      if (click("#new-chat")) {
        const box = document.querySelector("#input textarea");
        if (box) box.focus();
      }
    }
  });

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
