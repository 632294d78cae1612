"use strict";
// The analysts' page: state lives in the URL (?image=KEY&chunks=2,4&k=24&where=..&page=0), so a
// search can be shared; every change pushes a history entry and re-renders from the URL.

const $ = (id) => document.getElementById(id);
const PAGE = 48;
const WIDE = window.matchMedia("(min-width: 761px)");
let chunkList = [];
let upload = null;          // {file, url} while the query is an uploaded image (not in the URL)
let searchSeq = 0;          // drops answers to superseded searches

function readState() {
  const p = new URLSearchParams(location.search);
  return {
    image: p.get("image") || "",
    chunks: (p.get("chunks") || "").split(",").filter((c) => c !== ""),
    k: p.get("k") || "24",
    where: p.getAll("where"),
    page: Math.max(0, parseInt(p.get("page") || "0", 10) || 0),
  };
}

function writeState(s, replace) {
  const p = new URLSearchParams();
  if (s.image) p.set("image", s.image);
  if (s.chunks.length) p.set("chunks", s.chunks.join(","));
  if (s.k !== "24") p.set("k", s.k);
  s.where.forEach((w) => p.append("where", w));
  if (s.page) p.set("page", String(s.page));
  const url = location.pathname + (p.toString() ? "?" + p : "");
  (replace ? history.replaceState : history.pushState).call(history, null, "", url);
  render();
}

function update(changes, replace) {
  writeState(Object.assign(readState(), changes), replace);
}

function showStatus(message, info) {
  const el = $("status");
  el.textContent = message || "";
  el.hidden = !message;
  el.classList.toggle("info", !!info);
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((body.error && body.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function tile(item, caption, extra) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.key = item.key;
  button.dataset.id = item.id;
  button.title = item.key;
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = item.key;
  img.loading = "lazy";
  button.append(img);
  if (extra) {
    const d = document.createElement("span");
    d.className = "dist";
    d.textContent = extra;
    button.append(d);
  }
  const span = document.createElement("span");
  span.textContent = caption;
  button.append(span);
  button.addEventListener("click", () => {
    upload = null;
    update({ image: item.key });
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  return button;
}

function renderQuery(s) {
  const img = $("query-img");
  const label = $("query-label");
  if (upload) {
    img.src = upload.url;
    img.hidden = false;
    label.textContent = "uploaded: " + upload.file.name + " (not kept in the URL)";
  } else if (s.image) {
    img.src = "/images/" + encodeURIComponent(s.image);
    img.hidden = false;
    label.textContent = s.image;
  } else {
    img.hidden = true;
    label.textContent = "";
  }
  $("query-empty").hidden = !img.hidden;
  $("key-input").value = upload ? "" : s.image;
}

function renderChunks(s) {
  const list = $("chunks");
  if (!list.children.length) {
    chunkList.forEach((c) => list.append(chunkRow(c)));
  }
  for (const li of list.children) {
    const on = s.chunks.includes(li.dataset.chunk) || (li.dataset.name && s.chunks.includes(li.dataset.name));
    li.querySelector("input[type=checkbox]").checked = on;
    li.classList.toggle("on", on);
  }
}

function chunkRow(c) {
  const li = document.createElement("li");
  li.className = "chunk";
  li.dataset.chunk = String(c.index);
  li.dataset.name = c.name || "";
  const row = document.createElement("div");
  row.className = "row";
  const tick = document.createElement("label");
  tick.className = "tick";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.dataset.chunk = String(c.index);
  box.addEventListener("change", () => {
    const s = readState();
    const others = s.chunks.filter((x) => x !== String(c.index) && x !== (c.name || "\u0000"));
    const chunks = box.checked ? others.concat(String(c.index)) : others;
    chunks.sort((a, b) => Number(a) - Number(b));
    update({ chunks });
  });
  tick.append(box, " " + c.index);
  const name = document.createElement("input");
  name.type = "text";
  name.value = c.name || "";
  name.placeholder = "name this chunk";
  name.setAttribute("aria-label", "name of chunk " + c.index);
  const save = document.createElement("button");
  save.type = "button";
  save.textContent = "Save";
  save.disabled = true;
  name.addEventListener("input", () => { save.disabled = name.value === (c.name || ""); });
  name.addEventListener("keydown", (e) => { if (e.key === "Enter" && !save.disabled) save.click(); });
  save.addEventListener("click", () => nameChunk(c, name, save, li));
  row.append(tick, name, save);
  const strip = document.createElement("img");
  strip.className = "strip";
  strip.src = c.strip;
  strip.alt = "what chunk " + c.index + " changes";
  strip.loading = "lazy";
  const details = document.createElement("details");
  details.open = WIDE.matches;  // on a phone the strips fold away so the results stay near
  const summary = document.createElement("summary");
  summary.textContent = "what it changes";
  details.append(summary, strip);
  li.append(row, details);
  return li;
}

async function nameChunk(c, input, save, li, retried) {
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem("retrieval-token");
  if (token) headers.Authorization = "Bearer " + token;
  try {
    await api("/chunks/" + c.index, { method: "PUT", headers, body: JSON.stringify({ name: input.value }) });
    c.name = input.value.trim() || null;
    li.dataset.name = c.name || "";
    save.disabled = true;
    showStatus("chunk " + c.index + (c.name ? " is now named \u201c" + c.name + "\u201d" : " has no name now"), true);
  } catch (e) {
    if (e.status === 401 && !retried) {
      const given = window.prompt("This server needs its token to name chunks:");
      if (given) {
        sessionStorage.setItem("retrieval-token", given);
        return nameChunk(c, input, save, li, true);
      }
    }
    showStatus(e.message);
  }
}

async function renderResults(s) {
  const box = $("results");
  const note = $("results-note");
  const seq = ++searchSeq;
  if ((!s.image && !upload) || !s.chunks.length) {
    box.replaceChildren();
    note.textContent = !s.chunks.length ? "tick one or more chunks" : "choose a query image";
    return;
  }
  note.textContent = "searching\u2026";
  let result;
  try {
    if (upload) {
      const form = new FormData();
      form.append("file", upload.file);
      form.append("chunks", s.chunks.join(","));
      form.append("k", s.k);
      s.where.forEach((w) => form.append("where", w));
      result = await api("/search", { method: "POST", body: form });
    } else {
      const p = new URLSearchParams({ image: s.image, chunks: s.chunks.join(","), k: s.k });
      s.where.forEach((w) => p.append("where", w));
      result = await api("/search?" + p);
    }
  } catch (e) {
    if (seq !== searchSeq) return;
    box.replaceChildren();
    note.textContent = "";
    showStatus(e.message);
    return;
  }
  if (seq !== searchSeq) return;
  showStatus("");
  const names = result.chunks.map((c) => (chunkList[c] && chunkList[c].name) || "chunk " + c);
  note.textContent = result.results.length + " nearest by " + names.join(" + ");
  box.replaceChildren(...result.results.map((hit) => tile(hit, hit.key, "d = " + hit.distance.toFixed(4))));
}

async function renderGallery(s) {
  const p = new URLSearchParams({ offset: String(s.page * PAGE), limit: String(PAGE) });
  s.where.forEach((w) => p.append("where", w));
  let page;
  try {
    page = await api("/images?" + p);
  } catch (e) {
    showStatus(e.message);
    return;
  }
  const last = Math.max(0, Math.ceil(page.total / PAGE) - 1);
  $("gallery-note").textContent = "page " + (s.page + 1) + " of " + (last + 1) + " \u00b7 " + page.total + " images";
  $("prev").disabled = s.page <= 0;
  $("next").disabled = s.page >= last;
  $("gallery").replaceChildren(...page.images.map((im) => {
    const t = tile(im, im.key);
    t.classList.toggle("current", im.key === s.image);
    return t;
  }));
}

function render() {
  const s = readState();
  $("k").value = ["12", "24", "48", "96"].includes(s.k) ? s.k : "24";
  $("where").value = s.where.join(" ");
  renderQuery(s);
  renderChunks(s);
  renderResults(s);
  renderGallery(s);
}

async function start() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    upload = null;
    update({ image: $("key-input").value.trim() });
  });
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    if (upload) URL.revokeObjectURL(upload.url);
    upload = { file, url: URL.createObjectURL(file) };
    update({ image: "" });
    $("upload").value = "";
  });
  $("options").addEventListener("submit", (e) => {
    e.preventDefault();
    update({ k: $("k").value, where: $("where").value.split(/[\s,]+/).filter(Boolean) });
  });
  $("k").addEventListener("change", () => update({ k: $("k").value }));
  $("prev").addEventListener("click", () => update({ page: readState().page - 1 }));
  $("next").addEventListener("click", () => update({ page: readState().page + 1 }));
  window.addEventListener("popstate", render);
  try {
    const [health, chunks] = await Promise.all([api("/health"), api("/chunks")]);
    $("info").textContent = health.images.toLocaleString() + " images \u00b7 " + health.n_chunks +
      " chunks \u00b7 " + health.preset + " model on " + health.dataset_format + " data";
    chunkList = chunks.chunks;
  } catch (e) {
    showStatus("cannot reach the service: " + e.message);
  }
  render();
}

document.addEventListener("DOMContentLoaded", start);
