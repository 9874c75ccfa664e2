() => {
  // The chat's branches (app/ui_chat.py): a "‹ ›" link under an edited message or an answer asked
  // for again shows that version; the click goes to the server through the hidden #branch-go
  // button, whose js reads window.omniChat.target. Copying a message leaves out its closing
  // line (the model's name and the "‹ 2/3 ›" links: a span of class turn-meta).
  const META = /\n*<span class="turn-meta">[\s\S]*?<\/span>\s*$/;
  window.omniChat = {
    target: "",
    strip(text) { return typeof text === "string" ? text.replace(META, "") : text; },
  };
  document.addEventListener("click", (ev) => {
    const link = ev.target.closest && ev.target.closest('#chat a[href^="#turn-"]');
    if (!link) return;
    ev.preventDefault();
    ev.stopPropagation();
    window.omniChat.target = link.getAttribute("href").slice("#turn-".length);
    const go = document.querySelector("#branch-go");
    if (go) go.click();
  }, true);
  if (navigator.clipboard && !navigator.clipboard.omniWrapped) {
    const write = navigator.clipboard.writeText.bind(navigator.clipboard);
    navigator.clipboard.writeText = (text) => write(window.omniChat.strip(text));
    navigator.clipboard.omniWrapped = true;
  }
}
