// The selavpr page: localize a photo, see the matches and why, manage the reference photos.
// Plain browser JavaScript calling the service's JSON API on this origin; no build step.
"use strict";

const KEY_STORAGE = "selavpr.apiKey"; // sessionStorage: gone when the tab closes
const PAIRS_DRAWN = 60; // lines in "why this match": enough to see the pattern, few enough to follow each
const PAIRS_HEIGHT = 480; // both images are drawn at this height
const PAGE_SIZE = 24;
const STATUS_POLL_MS = { running: 700, idle: 5000 };

const $ = (id) => document.getElementById(id);
const state = { config: null, result: null, queryFile: null, queryUrl: null, map: null, page: 0, polling: null };

// --- talking to the service ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.set("X-API-Key", key);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(0, "network", "The service could not be reached. Is it running?");
    }
    if (response.status === 401 && attempt === 0 && (await askForKey(Boolean(key)))) continue;
    if (response.ok) return response.json();
    let body = null;
    try {
      body = (await response.json()).error;
    } catch (err) {
      /* not our JSON error body */
    }
    throw new ApiError(response.status, body?.type || "http", body?.message || response.statusText);
  }
}

function describe(err) {
  const detail = err.message ? ` (${err.message})` : "";
  switch (err.status) {
    case 0:
      return err.message;
    case 400:
      return `The file could not be read as an image${detail}.`;
    case 401:
      return "This needs the service's API key; the key given was missing or wrong.";
    case 409:
      return "The index was rebuilt since this result; localize the photo again.";
    case 413:
      return `The file is too large for the service${detail}.`;
    case 415:
      return `This is not an image the service accepts (JPEG, PNG, WebP, HEIC or AVIF)${detail}.`;
    case 422:
      return `The service refused the request${detail}.`;
    case 503:
      return `The service is not ready yet${detail}. Try again in a moment.`;
    default:
      return `The service answered ${err.status}${detail}.`;
  }
}

function askForKey(wasWrong) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = wasWrong
    ? "The API key was refused. Enter it again (kept for this browser tab only)."
    : "This action needs the service's API key. It is kept for this browser tab only.";
  $("key-input").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = $("key-input").value.trim();
        if (dialog.returnValue === "ok" && key) {
          sessionStorage.setItem(KEY_STORAGE, key);
          resolve(true);
        } else resolve(false);
      },
      { once: true },
    );
  });
}

function show(element, text, kind = "error") {
  element.textContent = text || "";
  element.hidden = !text;
  element.classList.toggle("ok", kind === "ok");
}

function megabytes(bytes) {
  return `${(bytes / 2 ** 20).toFixed(1)} MB`;
}

function fileSize(bytes) {
  return bytes < 2 ** 20 ? `${Math.ceil(bytes / 1024)} kB` : megabytes(bytes);
}

/** The refusal message when a file is over the limit, else null: nothing that large is ever sent. */
function oversize(file) {
  const limit = state.config.max_upload_bytes;
  if (file.size <= limit) return null;
  const [size, max] = [megabytes(file.size), megabytes(limit)];
  const exact = size === max ? ` (${file.size.toLocaleString("en")} bytes; at most ${limit.toLocaleString("en")})` : "";
  return `${file.name} is ${size}; the limit is ${max}${exact}. It was not sent.`;
}

// --- localize ------------------------------------------------------------------------------------

async function localize(file) {
  if (!file) return;
  show($("localize-message"), "");
  const refused = oversize(file);
  if (refused) return show($("localize-message"), refused);
  closePairs();
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryFile = file;
  state.queryUrl = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top_k", $("top-k").value);
  if ($("min-probability").value) form.append("min_probability", $("min-probability").value);
  $("localize-busy").hidden = false;
  const started = performance.now();
  try {
    const result = await api("/localize", { method: "POST", body: form });
    renderResult(file, result, performance.now() - started);
  } catch (err) {
    $("result").hidden = true;
    show($("localize-message"), describe(err));
  } finally {
    $("localize-busy").hidden = true;
  }
}

function renderResult(file, result, roundTripMs) {
  state.result = result;
  $("result").hidden = false;
  $("query-preview").src = state.queryUrl;
  $("query-caption").textContent = `${file.name} · ${fileSize(file.size)}`;
  $("estimate").textContent = describeEstimate(result);
  $("estimate").classList.toggle("unknown", result.status === "unknown");
  renderTimings(result.timings_ms, roundTripMs);
  renderMatches(result);
  drawMap(result);
}

/** What the answer says, and how far to trust it (docs: evaluation, "the answer's probability"). */
function describeEstimate(result) {
  const estimate = result.location;
  const probability = result.probability;
  const trust =
    probability === null || probability === undefined
      ? "this index is uncalibrated: no probability"
      : `probability ${(probability * 100).toFixed(0)} % that it is within ${result.radius_m} m of the truth`;
  if (result.status === "unknown") {
    return (
      `Unknown place: the best answer is probably wrong (${trust}, below the ` +
      `${(Number($("min-probability").value) * 100).toFixed(0)} % asked for). ` +
      "The photo's place may be missing from the references; the closest matches are listed below."
    );
  }
  if (!estimate) return "No location: none of the matches has one.";
  return (
    `Estimated location ${estimate.lat.toFixed(5)}, ${estimate.lon.toFixed(5)} ` +
    `(from match #${rankOf(result, estimate.source_id)}; ${trust}; confidence ` +
    `${(estimate.confidence * 100).toFixed(1)} %: the share of the photo's local features with a mutual match)`
  );
}

function rankOf(result, id) {
  return result.matches.find((m) => m.id === id)?.rank ?? "?";
}

function renderTimings(timings, roundTripMs) {
  const rows = [...Object.entries(timings), ["round trip", roundTripMs]];
  $("timings").replaceChildren(
    ...rows.flatMap(([stage, ms]) => [el("dt", {}, stage), el("dd", {}, `${Number(ms).toFixed(0)} ms`)]),
  );
}

function renderMatches(result) {
  const estimate = result.location;
  const items = result.matches.map((match) => {
    const distance =
      estimate && match.lat !== null && match.lon !== null
        ? formatDistance(haversine(estimate, match))
        : "no location";
    const thumb = el("img", {
      src: `/index/references/${match.id}/thumbnail?v=${encodeURIComponent(result.index_version)}`,
      alt: match.path,
    });
    const facts = el(
      "div",
      { class: "facts" },
      el("span", { class: "rank" }, `#${match.rank}`),
      el("span", { class: "score", title: "cosine similarity of the global descriptors" }, `score ${match.global_score.toFixed(3)}`),
      el("span", { class: "mnn", title: "mutual nearest-neighbour matches of local features" }, `${match.mnn_matches} MNN`),
      el("span", { class: "distance", title: "distance from the estimated location" }, distance),
    );
    const button = el("button", { type: "button", class: "match-open", title: "why this match" }, thumb, facts);
    button.addEventListener("click", () => openPairs(match));
    return el("li", { class: "match", "data-id": match.id }, button);
  });
  $("matches").replaceChildren(...items);
}

function haversine(a, b) {
  const rad = Math.PI / 180;
  const dLat = (b.lat - a.lat) * rad;
  const dLon = (b.lon - a.lon) * rad;
  const h = Math.sin(dLat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * 6371008.8 * Math.asin(Math.min(1, Math.sqrt(h)));
}

function formatDistance(metres) {
  return metres < 1000 ? `${metres.toFixed(0)} m away` : `${(metres / 1000).toFixed(2)} km away`;
}

// --- the map -------------------------------------------------------------------------------------

function ensureMap() {
  if (state.map) return state.map;
  const map = L.map("map", { attributionControl: true, zoomControl: true });
  const tiles = state.config.tiles;
  if (tiles) {
    L.tileLayer(tiles.url, { attribution: tiles.attribution || "", maxZoom: 19 }).addTo(map);
  } else {
    $("map").classList.add("plain");
    $("map-note").hidden = false;
  }
  state.layer = L.layerGroup().addTo(map);
  state.map = map;
  return map;
}

function drawMap(result) {
  const map = ensureMap();
  state.layer.clearLayers();
  const located = result.matches.filter((m) => m.lat !== null && m.lon !== null);
  const estimate = result.location;
  for (const match of located) {
    L.circleMarker([match.lat, match.lon], { radius: 6, color: "#555", weight: 1, fillOpacity: 0.6 })
      .bindTooltip(`#${match.rank}: ${match.mnn_matches} MNN`)
      .addTo(state.layer);
  }
  const points = located.map((m) => [m.lat, m.lon]);
  if (estimate) {
    // The circle shows how far the other matches lie from the estimate (median, at least 15 m):
    // a tight circle means the top matches agree on the place.
    const spread = located.filter((m) => m.id !== estimate.source_id).map((m) => haversine(estimate, m));
    spread.sort((a, b) => a - b);
    const radius = Math.max(15, spread.length ? spread[Math.floor(spread.length / 2)] : 15);
    L.circle([estimate.lat, estimate.lon], {
      radius,
      color: "#d9480f",
      weight: 2,
      fillOpacity: 0.1 + 0.3 * estimate.confidence,
      className: "confidence-circle",
    }).addTo(state.layer);
    L.marker([estimate.lat, estimate.lon], { title: "estimated location" })
      .bindTooltip(`estimate · confidence ${(estimate.confidence * 100).toFixed(1)} %`)
      .addTo(state.layer);
    points.push([estimate.lat, estimate.lon]);
  }
  if (points.length) {
    map.invalidateSize();
    map.fitBounds(L.latLngBounds(points).pad(0.3), { maxZoom: 17 });
  } else {
    map.setView([0, 0], 1);
  }
}

// --- why this match --------------------------------------------------------------------------------

async function openPairs(match) {
  const view = $("pairs-view");
  view.hidden = false;
  $("pairs-title").textContent = `Why match #${match.rank}: ${match.path}`;
  show($("pairs-message"), "");
  $("pairs-summary").textContent = "Matching local features…";
  $("pairs-svg").replaceChildren();
  const form = new FormData();
  form.append("image", state.queryFile, state.queryFile.name);
  form.append("reference_id", String(match.id));
  form.append("index_version", state.result.index_version);
  form.append("max_pairs", String(PAIRS_DRAWN));
  try {
    const answer = await api("/localize/pairs", { method: "POST", body: form });
    drawPairs(answer);
    $("pairs-summary").textContent =
      `${answer.mnn_matches} mutual nearest-neighbour matches between your photo (left) and the reference (right); ` +
      `${answer.pairs.length} drawn.`;
  } catch (err) {
    $("pairs-summary").textContent = "";
    show($("pairs-message"), describe(err));
  }
  view.scrollIntoView({ behavior: "smooth", block: "start" });
}

function drawPairs(answer) {
  const svg = $("pairs-svg");
  const gap = 12;
  const qs = PAIRS_HEIGHT / answer.query_size.height;
  const rs = PAIRS_HEIGHT / answer.reference_size.height;
  const qw = answer.query_size.width * qs;
  const rw = answer.reference_size.width * rs;
  svg.setAttribute("viewBox", `0 0 ${qw + gap + rw} ${PAIRS_HEIGHT}`);
  const refUrl = `/index/references/${answer.reference_id}/image?v=${encodeURIComponent(answer.index_version)}`;
  const lines = svgEl("g", { class: "pair-lines" });
  const ends = svgEl("g", { class: "pair-ends" });
  answer.pairs.forEach((pair, i) => {
    const colour = `hsl(${Math.round((i * 137.5) % 360)} 90% 55%)`; // golden angle: neighbours differ
    const [x1, y1] = [pair.query[0] * qs, pair.query[1] * qs];
    const [x2, y2] = [qw + gap + pair.reference[0] * rs, pair.reference[1] * rs];
    lines.append(svgEl("line", { x1, y1, x2, y2, stroke: colour }));
    ends.append(svgEl("circle", { cx: x1, cy: y1, r: 3, fill: colour }), svgEl("circle", { cx: x2, cy: y2, r: 3, fill: colour }));
  });
  svg.replaceChildren(
    svgEl("image", { href: state.queryUrl, x: 0, y: 0, width: qw, height: PAIRS_HEIGHT, preserveAspectRatio: "none" }),
    svgEl("image", { href: refUrl, x: qw + gap, y: 0, width: rw, height: PAIRS_HEIGHT, preserveAspectRatio: "none" }),
    lines,
    ends,
  );
}

function closePairs() {
  $("pairs-view").hidden = true;
  $("pairs-svg").replaceChildren();
}

// --- references --------------------------------------------------------------------------------------

async function refreshStatus() {
  let status;
  try {
    status = await api("/index/status");
  } catch (err) {
    show($("index-error"), describe(err));
    return schedulePoll("idle");
  }
  $("index-state").textContent = status.state;
  $("index-version").textContent = status.index_version || "none yet";
  $("index-count").textContent = String(status.num_images);
  $("index-report").textContent = status.last_report ? formatReport(status.last_report) : "–";
  show($("index-error"), status.last_error ? `Last rebuild failed: ${status.last_error}` : "");
  const running = status.state === "running";
  $("rebuild-box").hidden = !running;
  $("rebuild").disabled = running;
  if (running && status.progress) {
    const p = status.progress;
    $("rebuild-progress").max = Math.max(p.total, 1);
    $("rebuild-progress").value = p.done;
    const eta = p.eta_s ? `, about ${Math.ceil(p.eta_s)} s left` : "";
    $("rebuild-phase").textContent = `${p.phase}: ${p.done} / ${p.total}${eta}`;
  }
  if (state.shownVersion !== status.index_version) {
    state.shownVersion = status.index_version;
    loadReferences();
  }
  schedulePoll(running ? "running" : "idle");
}

function formatReport(r) {
  return `${r.version}: ${r.total} images (${r.encoded} encoded, ${r.reused} reused, ${r.removed} removed, ${r.skipped} skipped) in ${r.seconds} s`;
}

function schedulePoll(kind) {
  clearTimeout(state.polling);
  if ($("view-references").hidden) return;
  state.polling = setTimeout(refreshStatus, STATUS_POLL_MS[kind]);
}

async function startRebuild() {
  show($("rebuild-message"), "");
  try {
    await api("/index/rebuild", { method: "POST" });
  } catch (err) {
    show($("rebuild-message"), describe(err)); // apart from #index-error, which each status poll rewrites
  }
  refreshStatus();
}

async function loadReferences() {
  let page;
  try {
    page = await api(`/index/references?offset=${state.page * PAGE_SIZE}&limit=${PAGE_SIZE}`);
  } catch (err) {
    $("ref-grid").replaceChildren(el("li", { class: "empty" }, describe(err)));
    $("browse-range").textContent = "";
    return;
  }
  const cards = page.items.map((item) =>
    el(
      "li",
      { class: "ref", "data-id": item.id },
      el("img", {
        src: `/index/references/${item.id}/thumbnail?v=${encodeURIComponent(page.index_version)}`,
        alt: item.name,
      }),
      el("span", { class: "name", title: item.path }, item.name),
      el("span", { class: "where" }, item.lat !== null ? `${item.lat.toFixed(5)}, ${item.lon.toFixed(5)}` : "no location"),
    ),
  );
  $("ref-grid").replaceChildren(...(cards.length ? cards : [el("li", { class: "empty" }, "No references yet.")]));
  const first = page.total ? page.offset + 1 : 0;
  $("browse-range").textContent = `${first}–${page.offset + page.items.length} of ${page.total}`;
  $("page-prev").disabled = state.page === 0;
  $("page-next").disabled = page.offset + page.items.length >= page.total;
}

async function chooseReferences(files) {
  const rows = [];
  for (const file of files) {
    const gps = await ExifGps.read(file);
    const refused = oversize(file);
    const preview = el("img", { src: URL.createObjectURL(file), alt: file.name });
    const lat = el("input", { type: "number", step: "any", min: -90, max: 90, placeholder: "lat", class: "lat", value: gps ? gps.lat.toFixed(6) : "" });
    const lon = el("input", { type: "number", step: "any", min: -180, max: 180, placeholder: "lon", class: "lon", value: gps ? gps.lon.toFixed(6) : "" });
    const note = refused || (gps ? "location from the photo's GPS data" : "no GPS data: type a location, or leave empty");
    const row = el(
      "tr",
      { class: refused ? "refused" : "" },
      el("td", {}, preview),
      el("td", {}, el("span", { class: "name" }, file.name), el("small", { class: gps ? "exif" : "" }, note)),
      el("td", {}, lat),
      el("td", {}, lon),
      el("td", { class: "row-state" }, refused ? "too large" : ""),
    );
    rows.push({ file, row, lat, lon, refused });
  }
  state.pending = rows;
  $("ref-table").tBodies[0].replaceChildren(...rows.map((r) => r.row));
  $("ref-table").hidden = rows.length === 0;
  $("upload").disabled = !rows.some((r) => !r.refused);
  show($("upload-message"), "");
}

async function uploadReferences() {
  const rows = (state.pending || []).filter((r) => !r.refused);
  $("upload").disabled = true;
  let stored = 0;
  const problems = [];
  for (const r of rows) {
    const location = readLocation(r);
    if (location === "invalid") {
      problems.push(`${r.file.name}: give both latitude (−90…90) and longitude (−180…180), or neither`);
      continue;
    }
    const form = new FormData();
    form.append("image", r.file, r.file.name);
    if (location) {
      form.append("lat", String(location.lat));
      form.append("lon", String(location.lon));
    }
    try {
      await api("/index/images", { method: "POST", body: form });
      stored++;
      r.row.querySelector(".row-state").textContent = "uploaded";
    } catch (err) {
      problems.push(`${r.file.name}: ${describe(err)}`);
      r.row.querySelector(".row-state").textContent = "failed";
    }
  }
  const summary = `${stored} of ${rows.length} uploaded.`;
  if (problems.length) show($("upload-message"), `${summary} ${problems.join(" ")}`);
  else show($("upload-message"), summary, "ok");
  if (stored && $("rebuild-after").checked) await startRebuild();
}

function readLocation(r) {
  const lat = r.lat.value.trim();
  const lon = r.lon.value.trim();
  if (!lat && !lon) return null;
  const location = { lat: Number(lat), lon: Number(lon) };
  const valid = lat && lon && Math.abs(location.lat) <= 90 && Math.abs(location.lon) <= 180;
  return valid ? location : "invalid";
}

// --- page plumbing ---------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function selectTab(name) {
  for (const tab of ["localize", "references"]) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`view-${tab}`).hidden = !selected;
  }
  if (name === "references") refreshStatus();
  else if (state.map) state.map.invalidateSize();
}

async function refreshReadiness() {
  const pill = $("ready");
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    pill.textContent = response.ok ? `ready · ${body.index_version}` : "not ready";
    pill.title = response.ok ? "the service answers localize requests" : body.error?.message || "";
    pill.className = response.ok ? "pill ok" : "pill warn";
  } catch (err) {
    pill.textContent = "unreachable";
    pill.className = "pill warn";
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    localize(event.dataTransfer?.files?.[0]);
  });
}

async function main() {
  state.config = await api("/ui/config");
  const topK = $("top-k");
  for (const k of [1, 3, 5, 10, 20].filter((k) => k <= state.config.max_top_k)) {
    topK.append(el("option", { value: k }, String(k)));
  }
  topK.value = String(state.config.default_top_k);
  if (topK.value !== String(state.config.default_top_k)) topK.value = "5";
  for (const input of [$("query-file"), $("camera-file")]) {
    input.addEventListener("change", () => {
      localize(input.files[0]);
      input.value = ""; // choosing the same photo again localizes it again
    });
  }
  $("pairs-close").addEventListener("click", closePairs);
  $("tab-localize").addEventListener("click", () => selectTab("localize"));
  $("tab-references").addEventListener("click", () => selectTab("references"));
  $("rebuild").addEventListener("click", startRebuild);
  $("ref-files").addEventListener("change", (e) => chooseReferences([...e.target.files]));
  $("upload").addEventListener("click", uploadReferences);
  $("page-prev").addEventListener("click", () => {
    state.page = Math.max(0, state.page - 1);
    loadReferences();
  });
  $("page-next").addEventListener("click", () => {
    state.page += 1;
    loadReferences();
  });
  wireDropZone();
  refreshReadiness();
  setInterval(refreshReadiness, 10000);
  document.body.dataset.ready = "true"; // tests wait for this
}

document.addEventListener("DOMContentLoaded", main);
