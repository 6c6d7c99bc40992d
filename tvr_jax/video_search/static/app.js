// Search page: every piece of data from the server or the user is inserted with textContent or
// as an attribute value built from an id the server returned; innerHTML is never used.
"use strict";

const form = document.getElementById("search-form");
const input = document.getElementById("q");
const topSelect = document.getElementById("top");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function isId(s) { return /^[0-9a-f]{16}$/.test(s); }

function render(data, label) {
  results.replaceChildren();
  statusLine.textContent = `${data.results.length} result(s) for ${label} among ${data.indexed} ` +
      `videos (${(1000 * (data.timings.first_stage + data.timings.rescore)).toFixed(1)} ms search)`;
  for (const r of data.results) {
    if (!isId(r.id)) continue;
    const card = el("article", "card");
    card.dataset.id = r.id;
    const video = el("video");
    video.controls = true;
    video.preload = "none";
    video.poster = `/thumb/${r.id}`;
    video.src = `/media/${r.id}`;
    const name = el("div", "name", r.file);
    const meta = el("div", "meta");
    meta.append(el("span", "rank", `#${r.rank}`), el("span", "score", `score ${r.score.toFixed(4)}`),
                el("span", "duration", `${r.duration.toFixed(1)} s`));
    const similar = el("button", "similar", "similar videos");
    similar.type = "button";
    similar.addEventListener("click", () => run({video: r.id}, `videos like “${r.file}”`));
    card.append(video, name, meta, similar);
    results.append(card);
  }
}

async function run(params, label) {
  const query = new URLSearchParams({...params, top: topSelect.value});
  statusLine.textContent = "searching…";
  try {
    const response = await fetch(`/api/search?${query}`);
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    render(data, label);
  } catch (err) {
    results.replaceChildren();
    statusLine.textContent = `error: ${err.message}`;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const q = input.value.trim();
  if (q) run({q}, `“${q}”`);
});
