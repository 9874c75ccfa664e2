// Voice mode: microphone -> WebSocket (raw PCM) -> server; answer audio back,
// played through Web Audio. The server decides turns (VAD) and barge-in; on
// "interrupted" every scheduled buffer is stopped at once.
(() => {
  const WORKLET = `
    class Capture extends AudioWorkletProcessor {
      process(inputs) {
        const ch = inputs[0] && inputs[0][0];
        if (ch) this.port.postMessage(ch.slice(0));
        return true;
      }
    }
    registerProcessor("omni-capture", Capture);`;

  const state = { ws: null, ctx: null, stream: null, node: null, playHead: 0, sources: [], run: 0, opening: false,
                  stats: { audioChunks: 0, sentFrames: 0, states: [], transcripts: [], answer: "" } };

  const $ = (id) => document.getElementById(id);
  function setStatus(text) { const el = $("voice-status"); if (el) el.textContent = text; }
  function caption(role, text, append) {
    const box = $("voice-captions");
    if (!box) return;
    let last = box.lastElementChild;
    if (!append || !last || last.dataset.role !== role) {
      last = document.createElement("div");
      last.dataset.role = role;
      last.className = "voice-line voice-" + role;
      box.appendChild(last);
    }
    last.textContent = append ? last.textContent + text : text;
    box.scrollTop = box.scrollHeight;
  }
  function currentConversation() {
    const el = document.querySelector("#voice-cid textarea, #voice-cid input");
    return el ? el.value.trim() : "";
  }
  function syncConversation(cid) {
    const el = document.querySelector("#voice-cid textarea, #voice-cid input");
    if (el && cid && el.value !== cid) {
      el.value = cid;
      el.dispatchEvent(new Event("input", { bubbles: true }));
    }
    const btn = document.querySelector("#voice-refresh");
    if (btn) btn.click();
  }

  function stopPlayback() {
    for (const s of state.sources) { try { s.stop(); } catch (e) { /* already ended */ } }
    state.sources = [];
    if (state.ctx) state.playHead = state.ctx.currentTime;
  }

  function play(buf) {
    const view = new DataView(buf);
    const rate = view.getUint32(0, true);
    const pcm = new Int16Array(buf, 4);
    if (!pcm.length) return;
    const audio = state.ctx.createBuffer(1, pcm.length, rate);
    const data = audio.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
    const src = state.ctx.createBufferSource();
    src.buffer = audio;
    src.connect(state.ctx.destination);
    const at = Math.max(state.ctx.currentTime + 0.02, state.playHead);
    src.start(at);
    state.playHead = at + audio.duration;
    state.sources.push(src);
    src.onended = () => { state.sources = state.sources.filter((s) => s !== src); };
    state.stats.audioChunks += 1;
  }

  function onEvent(ev) {
    if (ev.type === "voice_state") {
      state.stats.states.push(ev.state);
      setStatus({ listening: "Listening…", hearing: "Hearing you…", thinking: "Thinking…",
                  speaking: "Speaking…", paused: "Pausing for you…",
                  interrupted: "Interrupted — go ahead" }[ev.state] || ev.state);
      if (ev.state === "interrupted" || ev.state === "paused") stopPlayback();
    } else if (ev.type === "transcript") {
      state.stats.transcripts.push(ev.text);
      caption("user", ev.text, false);
      state.stats.answer = "";
    } else if (ev.type === "text_delta") {
      state.stats.answer += ev.text;
      caption("assistant", ev.text, true);
      setStatus("Speaking…");
    } else if (ev.type === "tool_call") {
      caption("notice", "Making it: " + ev.name.replace(/_/g, " ") + "…", false);
    } else if (ev.type === "progress") {
      setStatus("Working… " + Math.round(ev.fraction * 100) + "%");
    } else if (ev.type === "perceived") {
      caption("notice", "Looked at " + ev.name, false);
    } else if (ev.type === "notice") {
      caption("notice", ev.message, false);
    } else if (ev.type === "error") {
      caption("error", ev.message, false);
      if (!ev.recoverable) stop();
    } else if (ev.type === "done") {
      syncConversation(ev.conversation_id);
    }
  }

  // Each start() is one run; stop() ends it. Everything a run set up (socket, microphone,
  // worklet) checks that it is still the current run before it acts, so nothing fires after
  // stop(): a socket that opens late or a microphone frame already queued is dropped.
  async function start() {
    if (state.ws || state.opening) return;
    const run = ++state.run;
    state.opening = true;
    try {
      setStatus("Opening the microphone…");
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
      if (run !== state.run) { stream.getTracks().forEach((t) => t.stop()); return; }
      state.stream = stream;
      const ctx = (state.ctx = new AudioContext());
      await ctx.resume();
      const url = URL.createObjectURL(new Blob([WORKLET], { type: "application/javascript" }));
      await ctx.audioWorklet.addModule(url);
      if (run !== state.run) return; // stop() has closed the stream and the context
      const source = ctx.createMediaStreamSource(stream);
      const node = (state.node = new AudioWorkletNode(ctx, "omni-capture"));
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${proto}//${location.host}/voice/ws`);
      ws.binaryType = "arraybuffer";
      state.ws = ws;
      ws.onopen = () => {
        if (state.ws !== ws) return;
        ws.send(JSON.stringify({ type: "start", sample_rate: ctx.sampleRate,
                                 conversation_id: currentConversation() }));
        let pending = [];
        let count = 0;
        node.port.onmessage = (e) => {
          if (state.ws !== ws) return;
          pending.push(e.data);
          count += e.data.length;
          if (count < ctx.sampleRate * 0.02 || ws.readyState !== 1) return; // ~20 ms frames
          const out = new Int16Array(count);
          let o = 0;
          for (const f of pending) for (let i = 0; i < f.length; i++) {
            out[o++] = Math.max(-32768, Math.min(32767, Math.round(f[i] * 32767)));
          }
          pending = []; count = 0;
          ws.send(out.buffer);
          state.stats.sentFrames += 1;
        };
        source.connect(node);
      };
      ws.onmessage = (e) => {
        if (state.ws !== ws) return;
        if (typeof e.data === "string") onEvent(JSON.parse(e.data));
        else play(e.data);
      };
      ws.onclose = () => { if (state.ws === ws) stop(); };
      const btn = $("voice-btn");
      if (btn) btn.classList.add("voice-on");
    } finally {
      if (run === state.run) state.opening = false;
    }
  }

  function stop() {
    const ws = state.ws;
    state.run += 1;
    state.ws = null;
    state.opening = false;
    stopPlayback();
    if (ws && ws.readyState <= 1) ws.close(); // connecting or open
    if (state.node) { state.node.port.onmessage = null; state.node.disconnect(); }
    if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
    if (state.ctx) state.ctx.close();
    state.stream = state.ctx = state.node = null;
    setStatus("Voice mode is off.");
    const btn = $("voice-btn");
    if (btn) btn.classList.remove("voice-on");
  }

  window.omniVoice = {
    start, stop, stats: state.stats,
    toggle: () => (state.ws || state.opening ? stop() : start().catch((err) => {
      stop();
      state.stats.error = String(err);
      setStatus("Voice mode could not start: " + err);
    })),
    interrupt: () => { stopPlayback(); if (state.ws) state.ws.send(JSON.stringify({ type: "stop" })); },
  };
})();
