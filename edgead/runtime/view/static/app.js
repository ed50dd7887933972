// edgead station view: one WebSocket to this station (status as JSON text, frames as binary:
// 4-byte length, JSON meta, JPEG). The page says "next" when it has shown a frame, so the server
// never sends faster than this browser can paint. Read-only: nothing here changes the run.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  // What the page has seen, for people with devtools and for the browser test and benchmark.
  const view = (window.edgeadView = { framesShown: 0, lastFrame: null, frameSize: null, lagMs: [], status: null,
    ended: false });
  const STAGES = ["preprocess", "infer", "postprocess", "sink", "end_to_end"];
  let socket = null;
  let frameUrl = null;
  let arrivals = [];
  let ngKey = "";

  const fmt = (v, digits = 2) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
  const text = (id, value) => { const el = $(id); if (el.textContent !== String(value)) el.textContent = value; };

  function setState(state, message) {
    document.body.dataset.state = state;
    text("connection", message);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${scheme}//${location.host}/ws`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => setState("live", "live");
    socket.onmessage = (event) => (typeof event.data === "string" ? onStatus(JSON.parse(event.data)) : onFrame(event.data));
    socket.onclose = () => {
      // After the end the page keeps the final counts and waits for the station's next run.
      if (view.ended) setState("ended", "run ended: final counts");
      else setState("disconnected", "disconnected: retrying…");
      setTimeout(connect, view.ended ? 5000 : 2000);
    };
  }

  function next() {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send("next");
  }

  function onFrame(buffer) {
    const length = new DataView(buffer).getUint32(0);
    const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
    const url = URL.createObjectURL(new Blob([new Uint8Array(buffer, 4 + length)], { type: "image/jpeg" }));
    const img = $("frame");
    img.onload = () => {
      if (frameUrl) URL.revokeObjectURL(frameUrl);
      frameUrl = url;
      shown(meta);
      next();
    };
    img.onerror = () => { URL.revokeObjectURL(url); next(); };
    img.src = url;
  }

  function shown(meta) {
    const now = performance.now();
    arrivals.push(now);
    arrivals = arrivals.filter((t) => now - t < 2000);
    view.framesShown += 1;
    view.lastFrame = meta.frame;
    markFrame(meta);
    if (meta.t_capture) {
      const lag = Date.now() - 1000 * meta.t_capture;
      view.lagMs.push(lag);
      if (view.lagMs.length > 2000) view.lagMs.shift();
      text("view-lag", fmt(lag, 0));
    }
    text("frame-id", meta.frame);
    text("view-fps", arrivals.length > 1 ? fmt((1000 * (arrivals.length - 1)) / (now - arrivals[0]), 1) : "–");
    showVerdict(meta.verdict, meta.score_norm, meta.score);
  }

  function markFrame(meta) {
    const img = $("frame");
    img.dataset.frame = meta.frame;
    img.dataset.verdict = meta.verdict;
    view.frameSize = [img.naturalWidth, img.naturalHeight];
  }

  function showVerdict(verdict, scoreNorm, scoreRaw) {
    const el = $("verdict");
    el.className = `verdict-${(verdict || "none").toLowerCase()}`;
    text("verdict", verdict || "–");
    text("score-norm", fmt(scoreNorm));
    text("score-raw", fmt(scoreRaw, 4));
  }

  function onStatus(status) {
    view.status = status;
    view.ended = status.ended;
    showRun(status.run);
    showBanners(status.banners || []);
    const frames = status.frames || {};
    for (const name of ["captured", "inspected", "dropped", "errored", "ng", "ok"]) text(`count-${name}`, frames[name] ?? "–");
    text("throughput", fmt(status.fps, 1));
    showLatency(status.latency_ms || {});
    text("counted-by", status.counted_by === "view" ? "counted from the frames this view received" : "");
    const last = status.last || {};
    if (view.framesShown === 0 && status.last) showVerdict(last.verdict, last.score_norm, last.score);
    $("error-line").hidden = last.verdict !== "ERROR";  // why the newest frame has no verdict
    text("error-line", last.verdict === "ERROR" ? `ERROR: ${last.error || "no result"}` : "");
    showStrip(status.ng || []);
    if (status.ended) setState("ended", "run ended: final counts");
  }

  function showRun(run) {
    if (!run) return;
    text("run-detector", run.detector || "–");
    text("run-engine", `${run.backend || "?"} / ${run.precision || "?"}`);
    const cert = run.certificate || {};
    const el = $("run-certificate");
    el.className = `cert-${cert.status || "unknown"}`;
    el.title = cert.detail || "";
    text("run-certificate", cert.status || "unknown");
    text("run-input", run.input || "–");
    text("threshold-raw", fmt(run.threshold, 4));
  }

  function showBanners(banners) {
    const box = $("banners");
    const key = JSON.stringify(banners);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren(...banners.map((b) => {
      const div = document.createElement("div");
      div.className = `banner banner-${b.kind}`;
      div.textContent = b.text;
      return div;
    }));
  }

  function showLatency(latency) {
    const rows = STAGES.filter((s) => latency[s]).map((s) => {
      const tr = document.createElement("tr");
      for (const value of [s === "end_to_end" ? "end-to-end" : s, fmt(latency[s].p50), fmt(latency[s].p99)]) {
        const cell = document.createElement(tr.children.length ? "td" : "th");
        cell.textContent = value;
        tr.appendChild(cell);
      }
      return tr;
    });
    $("latency-rows").replaceChildren(...rows);
  }

  function showStrip(entries) {
    const key = entries.map((e) => e.frame).join(",");
    if (key === ngKey) return;
    ngKey = key;
    $("ng-empty").hidden = entries.length > 0;
    $("ng-list").replaceChildren(...entries.map((e) => {
      const li = document.createElement("li");
      li.dataset.frame = e.frame;
      const image = document.createElement("a");
      image.href = e.image;
      image.target = "_blank";
      image.rel = "noopener";
      image.className = "ng-image";
      const thumb = document.createElement("img");
      thumb.src = e.thumb;
      thumb.alt = `NG part, frame ${e.frame}`;
      image.appendChild(thumb);
      const caption = document.createElement("span");
      caption.textContent = `#${e.frame} · ${fmt(e.score_norm)}${e.truth ? " · " + e.truth : ""} · `;
      const record = document.createElement("a");
      record.href = e.record;
      record.target = "_blank";
      record.rel = "noopener";
      record.className = "ng-record";
      record.textContent = "record";
      caption.appendChild(record);
      li.append(image, caption);
      return li;
    }));
  }

  connect();
})();
