// The page behind GET /: one image in, the API's answers out. No framework, no build step, no
// request leaves this server (the page is tested offline in headless Chromium).
"use strict";

const $ = (id) => document.getElementById(id);

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// The API's own error text: `detail` of its JSON body, else the status line.
async function apiError(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") return body.detail;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  const response = await fetch("/model");
  if (!response.ok) {
    $("model").textContent = `no model in service: ${await apiError(response)}`;
    return;
  }
  const model = await response.json();
  const trained = model.trained ? "" : " — untrained (random weights): predictions are meaningless";
  $("model").textContent =
    `Model in service: ${model.version} (${model.layout} layout, ${model.num_classes} classes)${trained}`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showPredictions(result) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const p of result.predictions) {
    const row = element("li", "prediction");
    const label = element("span", "label", p.label);
    label.title = p.wnid ? `${p.label} (${p.wnid})` : p.label;
    const track = element("span", "track");
    const bar = element("span", "bar");
    bar.style.width = `${(p.probability * 100).toFixed(2)}%`;
    bar.style.display = "block";
    track.append(bar);
    row.append(label, track, element("span", "probability", `${(p.probability * 100).toFixed(1)} %`));
    bars.append(row);
  }
  const t = result.timings;
  $("timing").textContent =
    `decode ${t.decode_ms.toFixed(1)} ms · crops ${t.preprocess_ms.toFixed(1)} ms · inference ${t.inference_ms.toFixed(1)} ms`;
  $("results").hidden = false;
}

function showNeighbours(neighbours) {
  const list = $("neighbours");
  list.replaceChildren();
  for (const n of neighbours) {
    const item = element("li", "neighbour");
    const img = element("img");
    img.src = n.thumbnail_url;
    img.alt = n.label || n.id;
    item.append(img, element("div", "neighbour-id", n.label ? `${n.id} · ${n.label}` : n.id),
      element("div", "distance muted", `distance ${n.distance.toFixed(2)}`));
    list.append(item);
  }
}

async function similar(file) {
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("/similar?k=5", { method: "POST", body: form });
  $("similar").hidden = false;
  if (!response.ok) {  // no features output, an empty gallery: say so, the prediction still stands
    $("similar-note").textContent = await apiError(response);
    $("neighbours").replaceChildren();
    return;
  }
  $("similar-note").textContent = "";
  showNeighbours((await response.json()).neighbours);
}

async function classify(file) {
  showError("");
  $("results").hidden = true;
  $("similar").hidden = true;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("file", file);
  let response;
  try {
    response = await fetch("/predict?top_k=5", { method: "POST", body: form });
  } catch (error) {
    showError(`the server cannot be reached: ${error}`);
    return;
  }
  if (!response.ok) {
    showError(await apiError(response));
    return;
  }
  showPredictions((await response.json()).results[0]);
  await similar(file);
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) classify(event.target.files[0]);
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
