// imcap web page: upload images, show the caption, the candidates and, per word, where the model looked.
// Plain JS, no libraries. The heat maps are drawn here from the attention numbers the API returns.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    file: $("file"), drop: $("drop"), viewer: $("viewer"), frame: $("frame"), photo: $("photo"), heat: $("heat"),
    busy: $("busy"), thumbs: $("thumbs"), status: $("status"), result: $("result"), caption: $("caption"),
    play: $("play"), playIcon: $("play-icon"), step: $("step"), stepLabel: $("step-label"), nbest: $("nbest"),
    model: $("model"), beam: $("beam"), nbestN: $("nbest-n"), maxlen: $("maxlen"), again: $("again"),
  };
  const PLAY_PATH = "M6 4l10 6-10 6z";
  const PAUSE_PATH = "M5 4h3.5v12H5zM11.5 4H15v12h-3.5z";
  const STEP_MS = 700; // per word when playing
  const CELL_PX = 16;
  const MAX_UPSCALE = 4; // small images are shown up to 4x their size // upsampled map resolution per grid cell, before the canvas smooths it further

  const state = {
    files: [], urls: [], results: [], grid: [1, 1],
    image: 0, // which uploaded image is shown
    candidate: 0, // which of its n-best captions
    pinned: 0, // word shown when not hovering: 0 = none, t = word t-1 (set by click, slider, play)
    shown: -1, // what the canvas holds now
    style: "heat",
    timer: null,
    limits: null,
    request: 0, // id of the latest request, so a slow old answer cannot overwrite a newer one
  };

  // ------------------------------------------------------------------------------------- colour map

  // Matplotlib's "inferno" at 9 points, as in imcap/visualize.py, interpolated to 256 entries.
  const INFERNO = (() => {
    const anchors = [[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
      [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164]];
    const lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const x = (i / 255) * (anchors.length - 1);
      const k = Math.min(Math.floor(x), anchors.length - 2);
      const f = x - k;
      for (let c = 0; c < 3; c++) lut[i * 3 + c] = Math.round(anchors[k][c] * (1 - f) + anchors[k + 1][c] * f);
    }
    return lut;
  })();

  // --------------------------------------------------------------------------------- heat map drawing

  // Catmull-Rom weights for a sample at fractional offset t in [0, 1).
  function cubicWeights(t) {
    const t2 = t * t, t3 = t2 * t;
    return [(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2];
  }

  // (gh, gw) grid -> (outH, outW) map in [0, 1]. Grid values sit at cell centres; the grid covers the whole
  // image (the encoder resizes it, no crop). The map is stretched from its minimum (0) to its maximum (1), so
  // that a weak preference still shows; peakRatio() says how strong it really is.
  function upsample(grid, outW, outH) {
    const gh = grid.length, gw = grid[0].length;
    const at = (i, j) => grid[Math.min(gh - 1, Math.max(0, i))][Math.min(gw - 1, Math.max(0, j))];
    const out = new Float32Array(outW * outH);
    let lo = Infinity, hi = 0;
    for (let y = 0; y < outH; y++) {
      const v = ((y + 0.5) / outH) * gh - 0.5, i0 = Math.floor(v), wy = cubicWeights(v - i0);
      for (let x = 0; x < outW; x++) {
        const u = ((x + 0.5) / outW) * gw - 0.5, j0 = Math.floor(u), wx = cubicWeights(u - j0);
        let s = 0;
        for (let a = 0; a < 4; a++) {
          let row = 0;
          for (let b = 0; b < 4; b++) row += wx[b] * at(i0 - 1 + a, j0 - 1 + b);
          s += wy[a] * row;
        }
        s = Math.max(0, s);
        out[y * outW + x] = s;
        lo = Math.min(lo, s);
        hi = Math.max(hi, s);
      }
    }
    const range = hi - lo;
    for (let k = 0; k < out.length; k++) out[k] = range > 1e-6 * hi ? (out[k] - lo) / range : 1; // flat map: all 1
    return out;
  }

  // How peaked a map is: its maximum over the uniform value 1/P (1 = looked everywhere alike).
  function peakRatio(grid) {
    let max = 0, n = 0;
    for (const row of grid) for (const v of row) { max = Math.max(max, v); n++; }
    return max * n;
  }

  function mapImage(grid, style) {
    const outW = grid[0].length * CELL_PX, outH = grid.length * CELL_PX;
    const m = upsample(grid, outW, outH);
    const data = new ImageData(outW, outH);
    for (let k = 0; k < m.length; k++) {
      const v = m[k], p = k * 4;
      if (style === "spotlight") { // the paper's look: keep where the model looked, darken the rest
        data.data[p] = data.data[p + 1] = data.data[p + 2] = 6;
        data.data[p + 3] = Math.round(235 * (1 - v) ** 1.3);
      } else { // inferno colours over the photo, more opaque where attention is high
        const c = Math.round(v * 255) * 3;
        data.data[p] = INFERNO[c]; data.data[p + 1] = INFERNO[c + 1]; data.data[p + 2] = INFERNO[c + 2];
        data.data[p + 3] = Math.round(255 * (0.3 + 0.45 * v));
      }
    }
    const small = document.createElement("canvas");
    small.width = outW; small.height = outH;
    small.getContext("2d").putImageData(data, 0, 0);
    return small;
  }

  // The photo as large as the frame allows (up to 68% of the window height), aspect kept.
  function layout() {
    const nw = el.photo.naturalWidth, nh = el.photo.naturalHeight;
    if (!nw || !nh) return;
    const maxW = el.frame.clientWidth, maxH = Math.max(200, window.innerHeight * 0.68);
    const scale = Math.min(maxW / nw, maxH / nh, MAX_UPSCALE);
    el.photo.style.width = `${Math.floor(nw * scale)}px`;
    el.photo.style.height = `${Math.floor(nh * scale)}px`;
  }

  function fitCanvas() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(el.photo.clientWidth * dpr)), h = Math.max(1, Math.round(el.photo.clientHeight * dpr));
    if (el.heat.width !== w || el.heat.height !== h) { el.heat.width = w; el.heat.height = h; state.shown = -1; }
  }

  // Draw word `t` (1-based; 0 = no map) of the current candidate.
  function draw(t) {
    fitCanvas();
    const key = `${state.image}/${state.candidate}/${t}/${state.style}`;
    if (state.shown === key) return;
    state.shown = key;
    const ctx = el.heat.getContext("2d");
    ctx.clearRect(0, 0, el.heat.width, el.heat.height);
    const cand = currentCandidate();
    if (!cand || t < 1 || !cand.attention || !cand.attention[t - 1]) return;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(mapImage(cand.attention[t - 1], state.style), 0, 0, el.heat.width, el.heat.height);
  }

  // ------------------------------------------------------------------------------------ words, slider

  const currentResult = () => state.results[state.image];
  const currentCandidate = () => { const r = currentResult(); return r && r.captions ? r.captions[state.candidate] : null; };
  const wordsOf = (cand) => cand.tokens.concat(cand.finished ? ["<end>"] : []);

  function show(t, { pin = false } = {}) {
    if (pin) state.pinned = t;
    const cand = currentCandidate();
    const words = cand ? wordsOf(cand) : [];
    for (const chip of el.caption.querySelectorAll(".word")) {
      const i = Number(chip.dataset.t);
      chip.classList.toggle("active", i === t);
      chip.classList.toggle("pinned", i === state.pinned && state.pinned > 0);
    }
    el.step.value = String(t);
    const grid = t > 0 && cand && cand.attention ? cand.attention[t - 1] : null;
    el.stepLabel.textContent = t > 0 ? `${t}/${words.length} · ${words[t - 1]}` : "image";
    el.stepLabel.title = grid ? `peak attention ${peakRatio(grid).toFixed(1)}× uniform` : "";
    draw(t);
  }

  function renderWords() {
    const cand = currentCandidate();
    el.caption.replaceChildren();
    wordsOf(cand).forEach((word, i) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = word === "<end>" ? "word end" : "word";
      chip.dataset.t = String(i + 1);
      chip.textContent = word === "<end>" ? "end" : word;
      chip.title = word === "<end>" ? "where it looked when it ended the caption" : `where it looked for “${word}”`;
      chip.addEventListener("pointerenter", () => { stop(); show(i + 1); });
      chip.addEventListener("focus", () => show(i + 1));
      chip.addEventListener("click", () => { stop(); show(state.pinned === i + 1 ? 0 : i + 1, { pin: true }); });
      el.caption.append(chip);
    });
    el.step.max = String(wordsOf(cand).length);
    show(state.pinned);
  }

  function renderCandidates() {
    const r = currentResult();
    el.nbest.replaceChildren();
    r.captions.forEach((cand, k) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cand";
      b.setAttribute("aria-pressed", String(k === state.candidate));
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = cand.caption || "(empty caption)";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = cand.score.toFixed(2).replace("-", "−") + (cand.finished ? "" : " · cut");
      score.title = cand.finished ? "log probability" : `log probability; it hit the ${state.lastOptions?.max_length}-word limit`;
      b.append(text, score);
      b.addEventListener("click", () => { stop(); state.candidate = k; state.pinned = 0; renderResult(); });
      li.append(b);
      el.nbest.append(li);
    });
    el.nbest.parentElement.querySelector("h2").hidden = r.captions.length < 2;
    el.nbest.hidden = r.captions.length < 2;
  }

  function renderResult() {
    const r = currentResult();
    for (const [k, t] of [...el.thumbs.children].entries()) t.setAttribute("aria-pressed", String(k === state.image));
    if (!r) return;
    if (r.error) {
      el.result.hidden = true;
      setStatus(r.error, "error");
      draw(0);
      return;
    }
    setStatus(`${r.filename} · ${r.width}×${r.height} · hover or tap a word, or press play`, "done");
    el.result.hidden = false;
    renderWords();
    renderCandidates();
  }

  // ------------------------------------------------------------------------------------------ playing

  function stop() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
    el.playIcon.setAttribute("d", PLAY_PATH);
    el.play.setAttribute("aria-label", "play the words one by one");
  }

  function play() {
    if (state.timer) { stop(); return; }
    const n = Number(el.step.max);
    if (!n) return;
    let t = state.pinned >= n || state.pinned < 1 ? 1 : state.pinned + 1;
    show(t, { pin: true });
    el.playIcon.setAttribute("d", PAUSE_PATH);
    el.play.setAttribute("aria-label", "pause");
    state.timer = setInterval(() => {
      t += 1;
      if (t > n) { stop(); return; }
      show(t, { pin: true });
    }, STEP_MS);
  }

  // ------------------------------------------------------------------------------------ upload, fetch

  function setStatus(text, kind = "") {
    el.status.textContent = text;
    el.status.className = `status ${kind}`;
  }

  function options() {
    const clamp = (input, lo, hi) => {
      const v = Math.round(Number(input.value));
      const c = Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : lo;
      input.value = String(c);
      return c;
    };
    const maxBeam = state.limits ? state.limits.max_beam_size : 10;
    const beam = clamp(el.beam, 1, maxBeam);
    return { beam_size: beam, n_best: clamp(el.nbestN, 1, beam),
      max_length: clamp(el.maxlen, 1, state.limits ? state.limits.max_length : 60) };
  }

  function setFiles(files) {
    files = [...files].filter((f) => f && f.size !== undefined);
    if (!files.length) return;
    if (state.limits && files.length > state.limits.max_images) {
      setStatus(`Too many images: at most ${state.limits.max_images} at a time.`, "error");
      return;
    }
    state.urls.forEach((u) => URL.revokeObjectURL(u));
    state.files = files;
    state.urls = files.map((f) => URL.createObjectURL(f));
    state.results = [];
    state.image = 0;
    renderThumbs();
    showImage(0);
    caption();
  }

  function renderThumbs() {
    el.thumbs.replaceChildren();
    el.thumbs.hidden = state.files.length < 2;
    state.urls.forEach((url, k) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "thumb";
      b.setAttribute("aria-label", `image ${k + 1}: ${state.files[k].name}`);
      const img = document.createElement("img");
      img.src = url;
      img.alt = "";
      b.append(img);
      b.addEventListener("click", () => { stop(); showImage(k); renderResult(); });
      el.thumbs.append(b);
    });
  }

  function showImage(k) {
    state.image = k;
    state.candidate = 0;
    state.pinned = 0;
    state.shown = -1;
    el.drop.classList.add("compact");
    el.viewer.hidden = false;
    el.photo.src = state.urls[k];
  }

  async function caption() {
    if (!state.files.length) return;
    const total = state.files.reduce((s, f) => s + f.size, 0);
    if (state.limits && total > state.limits.max_upload_bytes) {
      setStatus(`Too large: ${(total / 1e6).toFixed(1)} MB; the server takes at most ${(state.limits.max_upload_bytes / 1e6).toFixed(1)} MB per request.`, "error");
      return;
    }
    stop();
    const opts = options();
    const form = new FormData();
    state.files.forEach((f) => form.append("images", f, f.name));
    for (const [k, v] of Object.entries(opts)) form.append(k, String(v));
    form.append("attention", "true");
    const id = ++state.request;
    el.busy.hidden = false;
    el.again.disabled = true;
    el.result.hidden = true;
    setStatus("Captioning…", "busy");
    try {
      const response = await fetch("/v1/captions", { method: "POST", body: form });
      const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      if (id !== state.request) return;
      if (!response.ok) {
        const retry = response.headers.get("Retry-After");
        setStatus(body.error + (retry ? ` (retry in ${retry} s)` : ""), "error");
        state.results = body.results || [];
        markThumbs();
        return;
      }
      state.grid = body.grid;
      state.lastOptions = body.options;
      state.results = body.results;
      markThumbs();
      renderResult();
    } catch (err) {
      if (id === state.request) setStatus(`Could not reach the server (${err.message}).`, "error");
    } finally {
      if (id === state.request) { el.busy.hidden = true; el.again.disabled = false; }
    }
  }

  function markThumbs() {
    [...el.thumbs.children].forEach((b, k) => b.classList.toggle("bad", Boolean(state.results[k] && state.results[k].error)));
  }

  async function loadModel() {
    try {
      const info = await (await fetch("/v1/model")).json();
      state.limits = info.limits;
      const data = info.training_data || {};
      const items = [info.name, `trained on ${data.name || data.format || "?"}${data.format && data.name !== data.format ? ` (${data.format})` : ""}`,
        `${info.encoder.name} · ${info.encoder.grid[0]}×${info.encoder.grid[1]} grid`, `${info.vocab_size} words`];
      for (const key of ["BLEU-4", "CIDEr"]) {
        if (info.metrics && typeof info.metrics[key] === "number") items.push(`${key} ${info.metrics[key].toFixed(2)}`);
      }
      el.model.replaceChildren(...items.map((text) => { const li = document.createElement("li"); li.textContent = text; return li; }));
      el.beam.max = el.nbestN.max = String(info.limits.max_beam_size);
      el.maxlen.max = String(info.limits.max_length);
    } catch (err) {
      el.model.replaceChildren(Object.assign(document.createElement("li"), { textContent: "model info unavailable" }));
    }
  }

  // ------------------------------------------------------------------------------------------- wiring

  el.file.addEventListener("change", () => { setFiles(el.file.files); el.file.value = ""; });
  el.caption.addEventListener("pointerleave", () => show(state.pinned));
  el.step.addEventListener("input", () => { stop(); show(Number(el.step.value), { pin: true }); });
  el.play.addEventListener("click", play);
  el.again.addEventListener("click", caption);
  for (const b of document.querySelectorAll(".segmented button")) {
    b.addEventListener("click", () => {
      state.style = b.dataset.style;
      for (const o of document.querySelectorAll(".segmented button")) o.setAttribute("aria-pressed", String(o === b));
      draw(Number(el.step.value));
    });
  }
  el.photo.addEventListener("load", () => { layout(); state.shown = -1; draw(Number(el.step.value)); });
  new ResizeObserver(layout).observe(el.frame);
  new ResizeObserver(() => { state.shown = -1; draw(Number(el.step.value)); }).observe(el.photo);

  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) setFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) setFiles(files);
  });

  loadModel();
})();
