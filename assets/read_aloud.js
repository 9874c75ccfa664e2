() => {
  // Read aloud and voice messages; run once by demo.load (beside ui.js), they stay on window.
  // Read aloud: a speaker button in every answer's button bar posts the answer's text to
  // /voice/read-aloud and plays the raw PCM that comes back sentence by sentence through Web
  // Audio (as voice.js plays answers), from the first sentence on. The same button stops it;
  // so do Esc, the Stop button and reading another answer. Voice message: a microphone button
  // in the message box records (MediaRecorder, WebM/Opus) and, clicked again, attaches the
  // recording to the message; the server transcribes it when the message is sent.
  if (window.omniReadAloud) return;
  const ROUTE = "/voice/read-aloud";
  const limits = { recordSeconds: 300 };  // a voice message stops (and is attached) at this length
  const SPEAKER = '<svg viewBox="0 0 24 24" width="100%" height="100%" fill="none" stroke="currentColor" ' +
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">' +
    '<polygon points="4 9 8 9 13 5 13 19 8 15 4 15" fill="currentColor"/><path d="M16.5 8.5a5 5 0 0 1 0 7"/>' +
    '<path d="M19 6a8.5 8.5 0 0 1 0 12"/></svg>';
  const MIC = '<svg viewBox="0 0 24 24" width="100%" height="100%" fill="none" stroke="currentColor" ' +
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">' +
    '<rect x="9" y="2" width="6" height="12" rx="3"/><path d="M5 10a7 7 0 0 0 14 0"/><line x1="12" y1="17" ' +
    'x2="12" y2="22"/></svg>';
  const SQUARE = '<svg viewBox="0 0 24 24" width="100%" height="100%" aria-hidden="true">' +
    '<rect x="6" y="6" width="12" height="12" rx="1.5" fill="currentColor"/></svg>';

  const style = document.createElement("style");
  style.textContent = `
    .omni-read-aloud.omni-reading { color: #dc2626 !important; }
    .omni-read-aloud.omni-unavailable { opacity: 0.5; }
    #voice-message { flex: none; cursor: pointer; }
    #voice-message.omni-recording { width: auto; padding: 0 0.6em; gap: 0.35em; display: inline-flex;
                                    align-items: center; border-radius: 1em; background: #dc2626; color: white;
                                    font-size: 0.85em; font-variant-numeric: tabular-nums; white-space: nowrap; }
    #voice-message .omni-dot { width: 0.6em; height: 0.6em; border-radius: 50%; background: white;
                               animation: omni-blink 1s steps(2, start) infinite; }
    @keyframes omni-blink { to { visibility: hidden; } }
    #omni-toast { position: fixed; left: 50%; bottom: 24px; transform: translateX(-50%); z-index: 1000;
                  max-width: min(640px, 92vw); padding: 10px 16px; border-radius: 8px; font-size: 0.95em;
                  background: #1f2937; color: white; box-shadow: 0 4px 16px rgba(0,0,0,0.25); }
    #omni-toast[hidden] { display: none; }
    .omni-sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }`;
  document.head.appendChild(style);

  // --- telling the user -----------------------------------------------------------------
  const live = document.createElement("div");  // what a screen reader hears (recording started, attached...)
  live.className = "omni-sr-only";
  live.setAttribute("aria-live", "polite");
  document.body.appendChild(live);
  let toastTimer = 0;
  function toast(text) {
    let el = document.getElementById("omni-toast");
    if (!el) {
      el = document.createElement("div");
      el.id = "omni-toast";
      el.setAttribute("role", "alert");
      el.addEventListener("click", () => { el.hidden = true; });
      document.body.appendChild(el);
    }
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, 8000);
  }

  // --- read aloud ---------------------------------------------------------------------------
  const stats = { requests: 0, bytes: 0, chunks: 0, sampleRate: 0, state: "idle", error: "", text: "" };
  let reading = null;  // { button, ctrl, ctx, analyser, sources, playHead, ended }

  // The answer's text as shown, without code blocks, media, buttons or our turn-meta line.
  function answerText(bar) {
    let row = bar.closest(".message-buttons");
    while (row && !row.classList.contains("message-row")) row = row.previousElementSibling;
    if (!row) return "";
    const parts = [];
    for (const content of row.querySelectorAll(".message-content")) {
      const copy = content.cloneNode(true);
      copy.querySelectorAll("pre, .turn-meta, button, audio, video, img, svg, .katex-mathml, style, script")
        .forEach((el) => el.remove());
      copy.querySelectorAll("p, li, h1, h2, h3, h4, h5, h6, br, tr, blockquote, div")
        .forEach((el) => el.append("\n"));
      parts.push(copy.textContent);
    }
    return parts.join("\n").replace(/\n{2,}/g, "\n").trim();
  }

  function showButton(button, on) {
    if (!button) return;
    button.classList.toggle("omni-reading", on);
    const label = on ? "Stop reading aloud" : "Read aloud";
    button.setAttribute("aria-label", label);
    if (!button.dataset.unavailable) button.title = label;
    const icon = button.querySelector(".omni-icon");
    if (icon) icon.innerHTML = on ? SQUARE : SPEAKER;
  }

  function stopReading(why) {
    const r = reading;
    if (!r) return false;
    reading = null;
    r.ctrl.abort();
    for (const s of r.sources) { try { s.stop(); } catch (e) { /* already ended */ } }
    r.sources = [];
    r.ctx.close().catch(() => {});
    showButton(r.button, false);
    stats.state = why || "stopped";
    return true;
  }

  function schedule(r, bytes, rate) {
    let data = bytes;
    if (r.carry) {  // an odd byte left from the last piece
      data = new Uint8Array(r.carry.length + bytes.length);
      data.set(r.carry);
      data.set(bytes, r.carry.length);
    }
    const even = data.length - (data.length % 2);
    r.carry = even < data.length ? data.slice(even) : null;
    if (!even) return;
    const pcm = new Int16Array(data.buffer.slice(data.byteOffset, data.byteOffset + even));
    const buf = r.ctx.createBuffer(1, pcm.length, rate);
    const out = buf.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
    const src = r.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(r.analyser);
    const at = Math.max(r.ctx.currentTime + 0.05, r.playHead);
    src.start(at);
    r.playHead = at + buf.duration;
    r.sources.push(src);
    stats.chunks += 1;
    stats.state = "playing";
    src.onended = () => {
      r.sources = r.sources.filter((s) => s !== src);
      if (r.ended && !r.sources.length && reading === r) stopReading("done");
    };
  }

  async function read(button) {
    const text = answerText(button);
    stopReading();
    if (!text) { toast("There is nothing to read in this message."); return; }
    const ctx = new AudioContext();  // made in the click, so the browser lets it play
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 2048;
    analyser.connect(ctx.destination);
    const r = (reading = { button, ctrl: new AbortController(), ctx, analyser, sources: [], playHead: 0,
                           ended: false, carry: null });
    showButton(button, true);
    Object.assign(stats, { requests: stats.requests + 1, state: "loading", error: "", text });
    try {
      const res = await fetch(ROUTE, { method: "POST", headers: { "content-type": "application/json" },
                                       body: JSON.stringify({ text }), signal: r.ctrl.signal,
                                       credentials: "same-origin" });
      if (!res.ok) {
        let message = `Read aloud failed (HTTP ${res.status}).`;
        try { message = (await res.json()).error.message || message; } catch (e) { /* not JSON */ }
        throw Object.assign(new Error(message), { status: res.status });
      }
      delete button.dataset.unavailable;  // (a voice set since it said why not)
      button.classList.remove("omni-unavailable");
      const rate = Number(res.headers.get("x-sample-rate")) || 22050;
      stats.sampleRate = rate;
      const reader = res.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (reading !== r) { reader.cancel().catch(() => {}); return; }
        if (done) break;
        stats.bytes += value.length;
        schedule(r, value, rate);
      }
      r.ended = true;
      if (!r.sources.length) stopReading("done");
    } catch (err) {
      if (reading !== r) return;  // stopped: the abort is ours
      stopReading("failed");
      stats.error = err.message;
      if (err.status === 503) {  // the voice is not there: say why on the button, and now
        button.dataset.unavailable = "1";
        button.classList.add("omni-unavailable");
        button.title = err.message;
      }
      toast(err.message);
    }
  }

  function addButton(bar) {
    if (bar.querySelector(".omni-read-aloud")) return;
    const like = bar.querySelector("button.icon-button");  // Gradio's own look, copied
    const button = document.createElement("button");
    button.type = "button";
    button.className = (like ? like.className : "icon-button") + " omni-read-aloud";
    const icon = document.createElement("div");
    icon.className = ((like && like.firstElementChild && like.firstElementChild.className) || "") + " omni-icon";
    button.appendChild(icon);
    showButton(button, false);
    button.addEventListener("click", (e) => {
      e.stopPropagation();
      if (reading && reading.button === button) stopReading();
      else read(button);
    });
    bar.appendChild(button);
  }

  // --- voice message ------------------------------------------------------------------------
  const rec = { recorder: null, stream: null, parts: [], started: 0, ticker: 0, limit: 0, type: "" };

  function recordType() {
    const types = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"];
    return types.find((t) => window.MediaRecorder && MediaRecorder.isTypeSupported(t)) || "";
  }

  function clock(s) { return `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`; }

  function showMic() {
    const btn = document.getElementById("voice-message");
    if (!btn) return;
    const on = !!rec.recorder;
    const s = on ? (performance.now() - rec.started) / 1000 : 0;
    btn.classList.toggle("omni-recording", on);
    if (on) btn.removeAttribute("aria-label");  // named by its text: what it does, then the time shown
    else btn.setAttribute("aria-label", "Record a voice message");
    btn.title = on ? `Recording ${clock(s)} of at most ${clock(limits.recordSeconds)}: click to attach it`
                   : "Record a voice message (click again to attach it)";
    btn.innerHTML = on ? '<span class="omni-sr-only">Stop recording and attach the voice message, recorded </span>' +
                         `<span class="omni-dot"></span>${clock(s)}` : MIC;
  }

  function attach(file) {
    const input = document.querySelector('#input input[data-testid="file-upload"]');
    if (!input) { toast("The message box is not ready; the voice message was not attached."); return; }
    const dt = new DataTransfer();
    dt.items.add(file);
    input.files = dt.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  }

  async function startRecording() {
    stopReading();  // the microphone would hear it
    const type = recordType();
    if (!type || !navigator.mediaDevices) { toast("This browser cannot record audio."); return; }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true,
                                                                     noiseSuppression: true } });
    } catch (err) {
      toast("The microphone could not be opened: " + err.message);
      return;
    }
    const recorder = new MediaRecorder(stream, { mimeType: type, audioBitsPerSecond: 32000 });
    Object.assign(rec, { recorder, stream, parts: [], started: performance.now(), type: type.split(";")[0] });
    recorder.ondataavailable = (e) => { if (e.data && e.data.size) rec.parts.push(e.data); };
    recorder.onstop = () => {
      const seconds = (performance.now() - rec.started) / 1000;
      const ext = { "audio/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "m4a" }[rec.type] || "webm";
      const stamp = new Date().toTimeString().slice(0, 8).replace(/:/g, "");
      const file = new File(rec.parts, `voice-message-${stamp}.${ext}`, { type: rec.type });
      rec.stream.getTracks().forEach((t) => t.stop());
      Object.assign(rec, { recorder: null, stream: null, parts: [] });
      clearInterval(rec.ticker);
      clearTimeout(rec.limit);
      showMic();
      attach(file);
      live.textContent = `Voice message of ${clock(seconds)} attached. Type alongside it if you like, then send.`;
    };
    recorder.start(1000);
    rec.ticker = setInterval(showMic, 500);
    rec.limit = setTimeout(() => {
      stopRecording();
      toast(`Voice messages stop at ${clock(limits.recordSeconds)}; this one is attached.`);
    }, limits.recordSeconds * 1000);
    showMic();
    live.textContent = "Recording. Press the button again to attach the voice message.";
  }

  function stopRecording() {
    if (rec.recorder && rec.recorder.state !== "inactive") rec.recorder.stop();
  }

  function addMic() {
    const row = document.querySelector("#input .input-row");
    if (!row) return;
    const there = row.querySelector("#voice-message");
    if (there) {  // Gradio redraws its upload button after an attachment is sent: keep the mic beside it
      const clip = row.querySelector(":scope > .upload-button");
      if (clip && there.previousElementSibling !== clip) clip.after(there);
      return;
    }
    const btn = document.createElement("button");
    btn.type = "button";
    btn.id = "voice-message";
    const upload = row.querySelector(".upload-button");  // Gradio's own look, copied
    btn.className = upload ? upload.className.replace("upload-button", "") : "";
    btn.addEventListener("click", (e) => {
      e.preventDefault();
      if (rec.recorder) stopRecording();
      else startRecording();
    });
    if (upload) upload.after(btn); else row.prepend(btn);
    showMic();
  }

  // --- wiring -----------------------------------------------------------------------------
  let pending = false;
  function scan() {
    pending = false;
    document.querySelectorAll("#chat .message-buttons-left .icon-button-wrapper").forEach(addButton);
    addMic();
  }
  new MutationObserver(() => {
    if (!pending) { pending = true; requestAnimationFrame(scan); }
  }).observe(document.body, { childList: true, subtree: true });
  scan();
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && stopReading()) e.preventDefault(); });
  document.addEventListener("click", (e) => {  // the page's Stop and voice mode stop the reading too
    if (e.target.closest && e.target.closest("#stop, #voice-btn")) stopReading();
  }, true);

  window.omniReadAloud = {
    stats, limits, stop: stopReading,
    playing: () => !!reading && reading.ctx.state === "running" && reading.sources.length > 0,
    level() {  // the loudness now playing (RMS of what reaches the speakers); 0 when silent
      if (!reading) return 0;
      const a = new Float32Array(reading.analyser.fftSize);
      reading.analyser.getFloatTimeDomainData(a);
      return Math.sqrt(a.reduce((s, x) => s + x * x, 0) / a.length);
    },
    recording: () => !!rec.recorder,
    recordedSeconds: () => (rec.recorder ? (performance.now() - rec.started) / 1000 : 0),
  };
}
