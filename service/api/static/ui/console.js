// The operator's console: the models (/ui) and one model's versions, diagrams, monitoring and actions
// (/ui/models/{name}), as a thin client of the v1 JSON API. Pages change with history.pushState, so the key
// held in memory survives moving between them.

import * as api from "./api.js";
import { COLORS, histogram, lines } from "./charts.js";
import { clear, el, number } from "./dom.js";
import { FileError, readLabelled, requestBody } from "./files.js";

const main = document.getElementById("main");
const errorBox = document.getElementById("error");
const notice = document.getElementById("notice");
const METHODS = (document.documentElement.dataset.methods || "temperature").split(",");
const MODEL_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const KINDS = { logits: "logits-only", torchscript: "TorchScript", upstream: "upstream" };
const PAGE_SIZE = 20;
const HOURS = 24; // the monitoring charts: one point per hour of the last day
const FIGURES = ["ece", "mce", "brier", "nll", "accuracy", "overconfidence", "underconfidence"];

let session = { auth: false, role: null, key_sent: false };
// labelled data the user loaded on a model page (or fitted with), to draw diagrams of any version with
let loaded = null;
let diagramUrls = [];

// ------------------------------------------------------------------------------------------ messages

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearMessages() {
  errorBox.textContent = "";
  errorBox.hidden = true;
  notice.textContent = "";
}

function tell(message) {
  notice.textContent = message;
}

function failed(error) {
  if (error instanceof api.ApiError || error instanceof FileError) showError(error.message);
  else showError(`the console failed: ${error && error.message ? error.message : error}`);
}

function confirmAction(title, text, okLabel) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// ------------------------------------------------------------------------------------------ the key

function canWrite() {
  return !session.auth || session.role === "admin";
}

function writeReason() {
  if (session.role === "read") return "Changes need an admin key; this key has the read role, so it can see everything and change nothing.";
  return "Changes need an admin key.";
}

function renderKeyState() {
  const state = document.getElementById("key-state");
  if (!session.auth) state.textContent = "Auth is off: no key needed";
  else if (session.role) state.textContent = `Key role: ${session.role}`;
  else if (session.key_sent) state.textContent = "That key is not valid";
  else state.textContent = "No key yet";
  document.getElementById("key-remember").checked = api.isRemembered();
}

async function refreshSession() {
  session = await api.session();
  renderKeyState();
}

function actionButton(label, onClick, { disabledReason = null, className = null } = {}) {
  const reason = canWrite() ? disabledReason : writeReason();
  const button = el("button", { type: "button", class: className }, label);
  if (reason) {
    button.disabled = true;
    button.title = reason;
    if (!canWrite()) button.setAttribute("aria-describedby", "why-disabled");
    button.dataset.reason = reason;
  } else {
    button.addEventListener("click", onClick);
  }
  return button;
}

function whyDisabled() {
  // the reason, once per page (its id is what disabled buttons are described by); none when all is allowed
  return canWrite() ? [] : [el("p", { id: "why-disabled", class: "hint" }, writeReason())];
}

function actionsReason() {
  return canWrite() ? [] : [el("p", { class: "hint" }, writeReason())];
}

// ------------------------------------------------------------------------------------------ routing

function link(href, text) {
  return el("a", { href: api.root + href, "data-nav": true }, text);
}

function navigate(href) {
  history.pushState({}, "", href);
  route();
}

document.addEventListener("click", (event) => {
  const anchor = event.target.closest("a[data-nav]");
  if (!anchor || event.defaultPrevented || event.button !== 0) return;
  if (event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  navigate(anchor.getAttribute("href"));
});
window.addEventListener("popstate", () => route());

async function route() {
  clearMessages();
  const path = window.location.pathname.slice(api.root.length);
  const params = new URLSearchParams(window.location.search);
  clear(main);
  if (session.auth && !session.role) {
    document.title = "calibserve console";
    main.append(el("h1", {}, "calibserve console"), el("p", {}, "Enter an API key above (read or admin) to see the models."));
    document.getElementById("key-input").focus();
    return;
  }
  const match = /^\/ui\/models\/([^/]+)$/.exec(path);
  main.setAttribute("aria-busy", "true");
  try {
    if (match) await modelPage(decodeURIComponent(match[1]), params);
    else await listPage(params);
  } catch (error) {
    failed(error);
  } finally {
    main.setAttribute("aria-busy", "false");
  }
}

// ------------------------------------------------------------------------------------------ models

async function allModels() {
  const models = [];
  let cursor = null;
  for (let page = 0; page < 20; page += 1) {
    const query = new URLSearchParams({ limit: "1000" });
    if (cursor) query.set("cursor", cursor);
    const answer = await api.get(`/v1/models?${query}`);
    models.push(...answer.items);
    cursor = answer.next_cursor;
    if (!cursor) break;
  }
  return models;
}

async function listPage(params) {
  document.title = "Models – calibserve console";
  const heading = el("h1", {}, "Models");
  const search = el("input", { id: "search", type: "search", value: params.get("q") || "", "aria-controls": "models" });
  const form = el("form", { class: "search", role: "search" }, el("label", { for: "search" }, "Search models"), search);
  const table = el("table", { id: "models" });
  const pager = el("nav", { class: "pager", "aria-label": "pages of models" });
  const count = el("p", { class: "count", role: "status" });
  main.append(heading, form, count, el("div", { class: "scroll" }, table), pager);
  form.addEventListener("submit", (event) => event.preventDefault());
  const models = await allModels();
  let page = Math.max(1, Number(params.get("page")) || 1);

  function render() {
    const query = search.value.trim().toLowerCase();
    const shown = models.filter(
      (model) => !query || model.name.toLowerCase().includes(query) || (model.description || "").toLowerCase().includes(query),
    );
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    page = Math.min(page, pages);
    const url = new URLSearchParams();
    if (query) url.set("q", search.value.trim());
    if (page > 1) url.set("page", String(page));
    history.replaceState({}, "", `${api.root}/ui${url.toString() ? `?${url}` : ""}`);
    count.textContent = `${shown.length} of ${models.length} models`;
    clear(table).append(
      el("caption", { class: "visually-hidden" }, "Models, their kind, class count, active calibrator and monitoring state"),
      el("thead", {}, el("tr", {}, ...["Name", "Kind", "Classes", "Active version", "Method", "Monitoring (24h)"].map((h) => el("th", { scope: "col" }, h)))),
    );
    const body = el("tbody");
    for (const model of shown.slice((page - 1) * PAGE_SIZE, page * PAGE_SIZE)) {
      const active = model.active_calibrator;
      const monitoring = el("td", { class: "monitoring" }, active ? "…" : "no calibrator");
      body.append(
        el(
          "tr",
          {},
          el("th", { scope: "row" }, link(`/ui/models/${encodeURIComponent(model.name)}`, model.name)),
          el("td", {}, KINDS[model.kind] || model.kind),
          el("td", {}, number(model.num_classes)),
          el("td", {}, active ? `v${active.version}` : "none"),
          el("td", {}, active ? active.method : "—"),
          monitoring,
        ),
      );
      if (active) monitoringState(model.name, monitoring);
    }
    table.append(body);
    const previous = el("button", { type: "button", disabled: page <= 1 }, "Previous page");
    const next = el("button", { type: "button", disabled: page >= pages }, "Next page");
    previous.addEventListener("click", () => {
      page -= 1;
      render();
    });
    next.addEventListener("click", () => {
      page += 1;
      render();
    });
    clear(pager).append(previous, el("span", { "aria-live": "polite" }, ` Page ${page} of ${pages} `), next);
  }

  search.addEventListener("input", () => {
    page = 1;
    render();
  });
  render();
}

async function monitoringState(name, cell) {
  try {
    const report = await api.get(`${api.modelPath(name)}/monitoring?window=24h`);
    const state = (report.drift && report.drift.state) || "unknown";
    cell.textContent = `${state.replaceAll("_", " ")} · ${report.figures.n} outcomes`;
    cell.dataset.state = state;
  } catch (error) {
    cell.textContent = "—";
    cell.title = error.message;
  }
}

// ------------------------------------------------------------------------------------------ one model

function definitionList(pairs) {
  return el("dl", { class: "facts" }, ...pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

function when(timestamp) {
  // "2026-12-05T01:07:16+00:00" -> "2026-12-05 01:07 UTC" (the store writes UTC)
  if (!timestamp) return "—";
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})/.exec(timestamp);
  return match ? `${match[1]} ${match[2]} UTC` : timestamp;
}

function beforeAfter(fit, key) {
  if (!fit || !fit.before || !fit.after) return "—";
  return `${number(fit.before[key])} → ${number(fit.after[key])}`;
}

async function modelPage(name, params) {
  document.title = `${name} – calibserve console`;
  main.append(el("p", {}, link("/ui", "← All models")), el("h1", {}, name));
  if (!MODEL_NAME.test(name)) {
    showError(`“${name}” is not a model name: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit`);
    return;
  }
  const path = api.modelPath(name);
  const [model, versions] = await Promise.all([api.get(path), api.get(`${path}/calibrators?limit=1000`)]);
  if (loaded && loaded.model !== name) loaded = null;
  const active = versions.active_version;
  const items = versions.items;
  const wanted = Number(params.get("version"));
  const selected = items.find((item) => item.version === wanted) ? wanted : active ?? (items[0] && items[0].version);

  const classes = model.class_names ? model.class_names.slice(0, 100).join(", ") + (model.class_names.length > 100 ? ", …" : "") : "unnamed";
  main.append(
    definitionList([
      ["Kind", KINDS[model.kind] || model.kind],
      ["Classes", `${model.num_classes}: ${classes}`],
      ["Description", model.description || "—"],
      ["Active version", active ? `v${active}` : "none"],
    ]),
  );

  const sections = {
    versions: el("section", { "aria-labelledby": "h-versions" }),
    version: el("section", { "aria-labelledby": "h-version", id: "version-detail" }),
    diagram: el("section", { "aria-labelledby": "h-diagram", id: "diagram-section" }),
    compare: el("section", { "aria-labelledby": "h-compare" }),
    monitoring: el("section", { "aria-labelledby": "h-monitoring" }),
    actions: el("section", { "aria-labelledby": "h-actions" }),
  };
  main.append(...Object.values(sections));
  const reload = async (version, message) => {
    const query = version ? `?version=${version}` : "";
    history.replaceState({}, "", `${api.root}/ui/models/${encodeURIComponent(name)}${query}`);
    await route();
    if (message) tell(message);
  };

  versionsTable(sections.versions, name, items, active, selected, reload);
  actionsSection(sections.actions, name, reload);
  const parts = [monitoringSection(sections.monitoring, name, active)];
  if (selected) {
    const calibrator = api.get(`${path}/calibrators/${selected}`); // the selected version's document, read once
    parts.push(
      versionDetail(sections.version, name, selected, calibrator),
      diagramSection(sections.diagram, name, selected, calibrator),
      compareSection(sections.compare, name, items, active, selected),
    );
  } else {
    sections.version.append(el("h2", { id: "h-version" }, "Versions"), el("p", {}, "No calibrator yet: fit one below, or upload a document."));
  }
  await Promise.all(parts);
}

function versionsTable(section, name, items, active, selected, reload) {
  section.append(el("h2", { id: "h-versions" }, "Versions, newest first"), ...whyDisabled());
  if (!items.length) return;
  const head = ["Version", "Method", "Parameters", "n", "Fitted at", "ECE before → after", "NLL before → after", "Accuracy", "Actions"];
  const body = el("tbody");
  for (const item of items) {
    const isActive = item.version === active;
    const show = el("button", { type: "button", "aria-pressed": String(item.version === selected) }, "Show");
    show.addEventListener("click", () => reload(item.version));
    const activate = actionButton(
      "Activate",
      async () => {
        const ok = await confirmAction(
          `Activate version ${item.version}?`,
          `Every request for ${name} is calibrated with version ${item.version} (${item.method}) from now on, instead of version ${active ?? "none"}.`,
          "Activate",
        );
        if (!ok) return;
        try {
          await api.json("POST", `${api.modelPath(name)}/calibrators/${item.version}/activate`);
          await reload(item.version, `Version ${item.version} of ${name} is active.`);
        } catch (error) {
          failed(error);
        }
      },
      { disabledReason: isActive ? "This version is already the active one." : null },
    );
    const remove = actionButton(
      "Delete",
      async () => {
        const ok = await confirmAction(`Delete version ${item.version}?`, `Version ${item.version} of ${name} is deleted for good.`, "Delete");
        if (!ok) return;
        try {
          await api.json("DELETE", `${api.modelPath(name)}/calibrators/${item.version}`);
          await reload(null, `Version ${item.version} of ${name} was deleted.`);
        } catch (error) {
          failed(error);
        }
      },
      { disabledReason: isActive ? "The active version cannot be deleted; activate another one first." : null, className: "danger" },
    );
    const fit = item.fit || {};
    body.append(
      el(
        "tr",
        { "data-version": item.version, class: [isActive ? "active" : "", item.version === selected ? "selected" : ""].join(" ").trim() || null },
        el("th", { scope: "row" }, `v${item.version}`, isActive ? el("span", { class: "badge" }, "active") : null),
        el("td", {}, item.method),
        el("td", {}, item.temperature !== undefined ? `T = ${number(item.temperature)}` : "see details"),
        el("td", {}, number(fit.n)),
        el("td", { class: "nowrap" }, when(item.fitted_at)),
        el("td", {}, beforeAfter(fit, "ece")),
        el("td", {}, beforeAfter(fit, "nll")),
        el("td", {}, fit.after ? number(fit.after.accuracy) : "—"),
        el("td", { class: "actions" }, show, activate, remove),
      ),
    );
  }
  section.append(
    el("div", { class: "scroll" }, el("table", { id: "versions" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)))), body)),
  );
}

function parameterRows(calibrator) {
  const skip = new Set(["format_version", "model", "version", "fit", "convergence", "params", "fitted_at", "num_classes"]);
  const rows = [];
  const describe = (value) => {
    if (Array.isArray(value)) {
      const shape = [];
      let level = value;
      while (Array.isArray(level)) {
        shape.push(level.length);
        level = level[0];
      }
      return shape.length === 1 && value.length <= 10 ? value.map((v) => number(v)).join(", ") : `array of shape (${shape.join(", ")})`;
    }
    if (value && typeof value === "object") return JSON.stringify(value).slice(0, 200);
    return number(value);
  };
  for (const [key, value] of Object.entries(calibrator)) if (!skip.has(key)) rows.push([key, describe(value)]);
  for (const [key, value] of Object.entries(calibrator.params || {})) if (!(key in calibrator)) rows.push([`params.${key}`, describe(value)]);
  return rows;
}

async function versionDetail(section, name, version, pending) {
  const calibrator = await pending;
  const fit = calibrator.fit || {};
  section.append(el("h2", { id: "h-version" }, `Version ${version}`));
  const figureRows = FIGURES.filter((key) => fit.before && key in fit.before).map((key) =>
    el("tr", {}, el("th", { scope: "row" }, key), el("td", {}, number(fit.before[key])), el("td", {}, number(fit.after && fit.after[key]))),
  );
  const counts = fit.confidence_histogram;
  const histogramColumn =
    Array.isArray(counts) && counts.length
      ? el(
          "div",
          {},
          el("h3", {}, "Confidence histogram (calibrated, fit data)"),
          histogram({
            title: `Calibrated top-label confidence of version ${version}'s fit data`,
            counts,
            edges: counts.map((_, i) => i / counts.length).concat([1]),
            xLabel: "confidence",
            yLabel: "samples",
          }),
        )
      : null;
  section.append(
    el(
      "div",
      { class: "columns" },
      el(
        "div",
        {},
        el("h3", {}, "Parameters"),
        definitionList([["fitted at", when(calibrator.fitted_at)], ["n", number(fit.n)], ...parameterRows(calibrator)]),
      ),
      el(
        "div",
        {},
        el("h3", {}, "Fit-time figures"),
        figureRows.length
          ? el(
              "table",
              { id: "fit-figures" },
              el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "figure"), el("th", { scope: "col" }, "before"), el("th", { scope: "col" }, "after"))),
              el("tbody", {}, ...figureRows),
            )
          : el("p", {}, "This calibrator carries no fit-time figures."),
      ),
      histogramColumn,
    ),
  );
}

// ------------------------------------------------------------------------------------------ diagrams

function dataForm(id, submitLabel, extra = []) {
  const scores = el("input", { id: `${id}-scores`, type: "file", accept: ".npz,.npy,.csv", required: true });
  const labels = el("input", { id: `${id}-labels`, type: "file", accept: ".npy,.csv" });
  const kind = el("select", { id: `${id}-kind` }, el("option", { value: "logits" }, "logits"), el("option", { value: "probabilities" }, "probabilities"));
  const submit = el("button", { type: "submit" }, submitLabel);
  const form = el(
    "form",
    { class: "data-form", id },
    el("div", { class: "field" }, el("label", { for: scores.id }, "Scores (.npz with labels, or .npy / .csv)"), scores),
    el("div", { class: "field" }, el("label", { for: labels.id }, "Labels (.npy / .csv; not with an .npz)"), labels),
    el("div", { class: "field" }, el("label", { for: kind.id }, "The scores are"), kind),
    ...extra,
    el("div", { class: "field" }, submit),
  );
  return { form, scores, labels, kind, submit };
}

function binsTable(report, id) {
  const groups = ["uncalibrated", "calibrated"].filter((group) => report.reliability && report.reliability[group]);
  const first = report.reliability[groups[0]];
  const head = ["bin", ...groups.flatMap((group) => [`${group}: count`, `${group}: confidence`, `${group}: accuracy`])];
  const rows = first.counts.map((_, i) =>
    el(
      "tr",
      {},
      el("th", { scope: "row", class: "nowrap" }, `${number(first.edges[i], 3)}–${number(first.edges[i + 1], 3)}`),
      ...groups.flatMap((group) => {
        const bins = report.reliability[group];
        return [el("td", { "data-group": group }, number(bins.counts[i])), el("td", {}, number(bins.mean_confidence[i])), el("td", {}, number(bins.accuracy[i]))];
      }),
    ),
  );
  return el(
    "details",
    { class: "chart-data" },
    el("summary", {}, "The bins as a table"),
    el("div", { class: "scroll" }, el("table", { id }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)))), el("tbody", {}, ...rows))),
  );
}

async function diagramFigure(name, version, data) {
  const { body, type, query } = requestBody(data, {});
  const params = `?version=${version}${query ? `&${query.slice(1)}` : ""}`;
  const path = api.modelPath(name);
  const [report, image] = await Promise.all([
    api.json("POST", `${path}/evaluate${params}`, { body, type }),
    api.call("POST", `${path}/evaluate/diagram${params}`, { body, type, accept: "image/svg+xml" }),
  ]);
  const url = URL.createObjectURL(await image.blob());
  diagramUrls.push(url);
  const before = report.uncalibrated && report.uncalibrated.ece;
  const after = report.calibrated && report.calibrated.ece;
  const caption = `Version ${version} on ${data.name} (n = ${report.n}): ECE ${number(before)} before, ${number(after)} after calibration`;
  return el(
    "figure",
    { class: "diagram", "data-version": version, "data-ece-before": before, "data-ece-after": after },
    el("img", { src: url, alt: `Reliability diagram. ${caption}.`, width: 576, height: 672 }),
    el("figcaption", {}, caption, " ", el("a", { href: url, download: `${name}-v${version}-reliability.svg`, class: "download" }, "Download SVG")),
    binsTable(report, `bins-v${version}`),
  );
}

/** ECE of stored bins: the sum over bins of count x |mean confidence - accuracy|, over n (the service's sum). */
function binsEce(bins) {
  let n = 0;
  let sum = 0;
  bins.counts.forEach((count, i) => {
    n += count;
    if (count) sum += count * Math.abs(bins.mean_confidence[i] - bins.accuracy[i]);
  });
  return n ? sum / n : null;
}

/** The bins a version stores of its fit data (fit.reliability), shaped as an evaluation report's for binsTable. */
function storedReport(stored) {
  const edges = Array.from({ length: stored.n_bins + 1 }, (_, i) => i / stored.n_bins);
  const reliability = {};
  if (stored.before) reliability.uncalibrated = { ...stored.before, edges };
  if (stored.after) reliability.calibrated = { ...stored.after, edges };
  return { reliability };
}

/** A version's diagram on its fit data, drawn by the service from the bins the version stores (no data sent);
 * a note instead where it stores none (fitted before they were stored, or uploaded without them). */
async function storedFigure(name, calibrator, idPrefix = "") {
  const version = calibrator.version;
  const stored = calibrator.fit && calibrator.fit.reliability;
  if (!stored || !(stored.before || stored.after)) {
    return el(
      "p",
      { class: "hint no-stored-diagram", "data-version": version },
      `Version ${version} stores no reliability bins of its fit data (it was fitted before they were stored, or uploaded without them): draw its diagram on a labelled set.`,
    );
  }
  const image = await api.call("GET", `${api.modelPath(name)}/calibrators/${version}/diagram`, { accept: "image/svg+xml" });
  const url = URL.createObjectURL(await image.blob());
  diagramUrls.push(url);
  const before = stored.before ? binsEce(stored.before) : null;
  const after = stored.after ? binsEce(stored.after) : null;
  const n = (stored.after || stored.before).counts.reduce((a, b) => a + b, 0);
  const caption = `Version ${version} on its fit data (n = ${n}): ECE ${number(before)} before, ${number(after)} after calibration`;
  return el(
    "figure",
    { class: "diagram stored", "data-version": version, "data-ece-before": before, "data-ece-after": after },
    el("img", { src: url, alt: `Reliability diagram. ${caption}.`, width: 576, height: 672 }),
    el("figcaption", {}, caption, " ", el("a", { href: url, download: `${name}-v${version}-fit-reliability.svg`, class: "download" }, "Download SVG")),
    binsTable(storedReport(stored), `${idPrefix}stored-bins-v${version}`),
  );
}

async function drawStored(target, name, calibrator, idPrefix = "") {
  try {
    clear(target).append(await storedFigure(name, await calibrator, idPrefix));
  } catch (error) {
    clear(target);
    failed(error);
  }
}

function releaseDiagrams() {
  for (const url of diagramUrls) URL.revokeObjectURL(url);
  diagramUrls = [];
}

async function drawInto(target, name, version) {
  clear(target).append(el("p", { role: "status" }, "Drawing the diagram…"));
  try {
    const figure = await diagramFigure(name, version, loaded);
    clear(target).append(figure);
  } catch (error) {
    clear(target);
    failed(error);
  }
}

async function diagramSection(section, name, version, calibrator) {
  releaseDiagrams();
  const stored = el("div", { id: "stored-diagram", "aria-live": "polite" }, el("p", { role: "status" }, "Drawing the diagram…"));
  section.append(
    el("h2", { id: "h-diagram" }, `Reliability diagram of version ${version}`),
    el("p", {}, "Before and after calibration on the data it was fitted on, from the bins the version stores: the figure calibserve evaluate --plot writes."),
    stored,
    el("h3", { id: "h-evaluate" }, "Evaluate on another labelled set"),
    el("p", {}, "The same figure on labelled data you load here: the data stays in this page and is sent to /evaluate."),
  );
  const { form, scores, labels, kind } = dataForm("diagram-form", "Draw diagram");
  const target = el("div", { id: "diagram", "aria-live": "polite" });
  const using = el("p", { class: "hint" }, loaded ? `Data: ${loaded.name}` : "No data loaded yet.");
  section.append(form, using, target);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessages();
    try {
      loaded = { ...(await readLabelled(scores.files[0], labels.files[0], kind.value)), model: name };
      using.textContent = `Data: ${loaded.name}`;
      const compare = document.getElementById("compare-draw");
      if (compare) {
        compare.disabled = false;
        compare.removeAttribute("title");
      }
    } catch (error) {
      failed(error);
      return;
    }
    await drawInto(target, name, version);
  });
  await Promise.all([drawStored(stored, name, calibrator), loaded ? drawInto(target, name, version) : null]);
}

// ------------------------------------------------------------------------------------------ compare

async function compareSection(section, name, items, active, selected) {
  section.append(el("h2", { id: "h-compare" }, "Compare two versions"));
  if (items.length < 2) {
    section.append(el("p", {}, "One version only: nothing to compare yet."));
    return;
  }
  const options = (chosen) => items.map((item) => el("option", { value: item.version, selected: item.version === chosen }, `v${item.version} (${item.method})`));
  const other = items.find((item) => item.version !== selected).version;
  const left = el("select", { id: "compare-a" }, ...options(selected));
  const right = el("select", { id: "compare-b" }, ...options(other));
  const draw = el("button", { type: "button", id: "compare-draw", disabled: !loaded, title: loaded ? null : "Load labelled data above first" }, "Draw both diagrams");
  const table = el("div", { id: "compare", class: "scroll" });
  const stored = el("div", { class: "side-by-side", id: "compare-stored", "aria-live": "polite" });
  const diagrams = el("div", { class: "side-by-side", id: "compare-diagrams" });
  section.append(
    el(
      "div",
      { class: "data-form" },
      el("div", { class: "field" }, el("label", { for: "compare-a" }, "Version A"), left),
      el("div", { class: "field" }, el("label", { for: "compare-b" }, "Version B"), right),
    ),
    table,
    el("h3", {}, "On their fit data"),
    stored,
    el("h3", {}, "On the labelled set loaded above"),
    el("div", { class: "data-form" }, el("div", { class: "field" }, draw)),
    diagrams,
  );
  const path = api.modelPath(name);
  let drawn = 0; // the latest choice of versions: an earlier, slower answer does not replace its figures
  async function render() {
    const turn = ++drawn;
    try {
      const [a, b] = await Promise.all([api.get(`${path}/calibrators/${left.value}`), api.get(`${path}/calibrators/${right.value}`)]);
      if (turn !== drawn) return;
      const rows = new Map();
      for (const [key, value] of parameterRows(a)) rows.set(key, [value, "—"]);
      for (const [key, value] of parameterRows(b)) rows.set(key, [(rows.get(key) || ["—"])[0], value]);
      rows.set("fitted at", [a.fitted_at || "—", b.fitted_at || "—"]);
      rows.set("n", [number(a.fit && a.fit.n), number(b.fit && b.fit.n)]);
      const body = el("tbody");
      for (const [key, [x, y]] of rows) body.append(el("tr", {}, el("th", { scope: "row" }, key), el("td", {}, x), el("td", {}, y), el("td", {}, "")));
      for (const group of ["before", "after"]) {
        for (const key of FIGURES) {
          const x = a.fit && a.fit[group] ? a.fit[group][key] : null;
          const y = b.fit && b.fit[group] ? b.fit[group][key] : null;
          if (x === null && y === null) continue;
          const change = typeof x === "number" && typeof y === "number" ? (y - x >= 0 ? "+" : "") + (y - x).toFixed(4) : "";
          body.append(el("tr", {}, el("th", { scope: "row" }, `${key} (${group})`), el("td", {}, number(x)), el("td", {}, number(y)), el("td", {}, change)));
        }
      }
      const head = el("thead", {}, el("tr", {}, el("th", { scope: "col" }, ""), el("th", { scope: "col" }, `v${a.version}`), el("th", { scope: "col" }, `v${b.version}`), el("th", { scope: "col" }, "B − A")));
      clear(table).append(el("table", { id: "compare-table" }, head, body));
      const [x, y] = [el("div"), el("div")];
      clear(stored).append(x, y);
      await Promise.all([drawStored(x, name, a, "compare-"), drawStored(y, name, b, "compare-")]);
    } catch (error) {
      failed(error);
    }
  }
  left.addEventListener("change", render);
  right.addEventListener("change", render);
  draw.addEventListener("click", async () => {
    clear(diagrams);
    const a = el("div");
    const b = el("div");
    diagrams.append(a, b);
    await Promise.all([drawInto(a, name, Number(left.value)), drawInto(b, name, Number(right.value))]);
  });
  await render();
}

// ------------------------------------------------------------------------------------------ monitoring

// The monitoring route answers one trailing window at a time (sums over the window's minute and hour rows). Its
// bins carry counts and means, so each window's sums are exact (count x mean): the difference of the windows
// "k h" and "k-1 h" is the sums of the hour between, from which that hour's ECE (the sum over bins of
// |correct - confidence| over n), accuracy and expected accuracy follow as the service computes them.
function windowSums(report) {
  const bins = report.figures.bins;
  return {
    n: bins.map((bin) => bin.count),
    confidence: bins.map((bin) => (bin.count ? bin.count * bin.confidence : 0)),
    correct: bins.map((bin) => (bin.count ? bin.count * bin.accuracy : 0)),
    predictions: report.label_free.predictions,
    confidenceTotal: report.label_free.predictions ? report.label_free.predictions * report.label_free.expected_accuracy : 0,
  };
}

function hourlySeries(reports) {
  const hours = [];
  let previous = null;
  for (const report of reports) {
    const sums = windowSums(report);
    const minus = (key) => (previous ? sums[key].map((value, b) => value - previous[key][b]) : sums[key]);
    const n = minus("n");
    const confidence = minus("confidence");
    const correct = minus("correct");
    const total = n.reduce((a, b) => a + b, 0);
    const predictions = sums.predictions - (previous ? previous.predictions : 0);
    const confidenceTotal = sums.confidenceTotal - (previous ? previous.confidenceTotal : 0);
    const gaps = correct.reduce((acc, value, b) => acc + Math.abs(value - confidence[b]), 0);
    hours.push({
      outcomes: Math.round(total),
      predictions,
      ece: total > 0 ? gaps / total : null,
      accuracy: total > 0 ? correct.reduce((a, b) => a + b, 0) / total : null,
      expected: predictions > 0 ? confidenceTotal / predictions : null,
    });
    previous = sums;
  }
  return hours.reverse(); // oldest first
}

async function monitoringSection(section, name, active) {
  section.append(el("h2", { id: "h-monitoring" }, "Monitoring"));
  if (!active) {
    section.append(el("p", {}, "No active calibrator: nothing is monitored."));
    return;
  }
  const path = `${api.modelPath(name)}/monitoring?window=`;
  const [day, week] = await Promise.all([api.get(`${path}24h`), api.get(`${path}7d`)]);
  if (!week.figures.n && !week.label_free.predictions) {
    section.append(el("p", { id: "monitoring-empty" }, "No logged predictions or outcomes in the last 7 days yet: the charts appear once there are some."));
    return;
  }
  const windows = await Promise.all(Array.from({ length: HOURS }, (_, i) => (i === HOURS - 1 ? day : api.get(`${path}${i + 1}h`))));
  const hours = hourlySeries(windows);
  const points = hours.map((_, i) => `${HOURS - i}–${HOURS - i - 1} h ago`);
  const ticks = [[0, `−${HOURS} h`], [HOURS / 2 - 1, `−${HOURS / 2} h`], [HOURS - 1, "last hour"]];
  const drift = day.drift.state.replaceAll("_", " ");
  section.append(
    el("p", {}, `Over the last 24 h: ${day.figures.n} outcomes, ECE ${number(day.figures.ece)}, drift state: ${drift}. One point per hour; the table under each chart has the numbers.`),
    el(
      "div",
      { class: "charts" },
      lines({ id: "series-ece", title: "ECE of the labelled outcomes, per hour", points, ticks, series: [{ name: "ECE", values: hours.map((h) => h.ece), color: COLORS[1] }], yLabel: "ECE" }),
      lines({
        id: "series-accuracy",
        title: "Accuracy and expected accuracy (mean confidence), per hour",
        points,
        ticks,
        series: [
          { name: "accuracy", values: hours.map((h) => h.accuracy), color: COLORS[0] },
          { name: "expected accuracy", values: hours.map((h) => h.expected), color: COLORS[2] },
        ],
        yLabel: "accuracy",
        yMax: 1,
      }),
      lines({
        id: "series-volume",
        title: "Outcomes and predictions per hour",
        points,
        ticks,
        series: [
          { name: "outcomes", values: hours.map((h) => h.outcomes), color: COLORS[3] },
          { name: "predictions", values: hours.map((h) => h.predictions), color: COLORS[0] },
        ],
        yLabel: "per hour",
      }),
    ),
  );
}

// ------------------------------------------------------------------------------------------ actions

function actionsSection(section, name, reload) {
  section.append(el("h2", { id: "h-actions" }, "Change this model"), ...actionsReason());
  const path = api.modelPath(name);

  const documentFile = el("input", { id: "upload-file", type: "file", accept: ".json,application/json" });
  const uploadActivate = el("input", { id: "upload-activate", type: "checkbox", checked: true });
  const uploadButton = actionButton("Upload", async () => {
    clearMessages();
    const file = documentFile.files[0];
    if (!file) {
      showError("choose a calibrator document (.json) first");
      return;
    }
    const ok = await confirmAction("Upload this calibrator?", `${file.name} becomes a new version of ${name}${uploadActivate.checked ? " and the active one" : ""}.`, "Upload");
    if (!ok) return;
    try {
      const stored = await api.json("POST", `${path}/calibrators?activate=${uploadActivate.checked}`, { body: await file.text(), type: "application/json" });
      await reload(stored.version, `Uploaded as version ${stored.version}.`);
    } catch (error) {
      failed(error);
    }
  });
  section.append(
    el("h3", {}, "Upload a calibrator document"),
    el(
      "div",
      { class: "data-form", id: "upload-form" },
      el("div", { class: "field" }, el("label", { for: "upload-file" }, "Document (.json, from calibserve fit)"), documentFile),
      el("div", { class: "field" }, el("label", { class: "check" }, uploadActivate, " activate it")),
      el("div", { class: "field" }, uploadButton),
    ),
  );

  const method = el("select", { id: "fit-form-method" }, ...METHODS.map((m) => el("option", { value: m }, m)));
  const activate = el("input", { id: "fit-form-activate", type: "checkbox", checked: true });
  const progress = el("progress", { id: "fit-progress", max: 1, value: 0, hidden: true, "aria-label": "fit progress" });
  const progressText = el("span", { id: "fit-progress-text", role: "status" });
  const { form, scores, labels, kind, submit } = dataForm("fit-form", "Fit", [
    el("div", { class: "field" }, el("label", { for: method.id }, "Method"), method),
    el("div", { class: "field" }, el("label", { class: "check" }, activate, " activate it")),
  ]);
  if (!canWrite()) {
    submit.disabled = true;
    submit.title = writeReason();
    submit.setAttribute("aria-describedby", "why-disabled");
    submit.dataset.reason = writeReason();
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessages();
    let data;
    try {
      data = { ...(await readLabelled(scores.files[0], labels.files[0], kind.value)), model: name };
    } catch (error) {
      failed(error);
      return;
    }
    const ok = await confirmAction(
      "Fit a new version?",
      `A ${method.value} calibrator is fitted on ${data.name} and stored as a new version of ${name}${activate.checked ? ", which becomes the active one" : ""}.`,
      "Fit",
    );
    if (!ok) return;
    const { body, type, query } = requestBody(data, { method: method.value, activate: activate.checked });
    progress.hidden = false;
    submit.disabled = true;
    try {
      const stored = await api.upload("POST", `${path}/fit${query}`, body, type, (fraction) => {
        if (fraction === null) {
          progress.removeAttribute("value");
          progressText.textContent = "Sent; fitting…";
        } else {
          progress.value = fraction;
          progressText.textContent = `Sending ${Math.round(fraction * 100)} %`;
        }
      });
      loaded = data;
      await reload(stored.version, `Fitted version ${stored.version} (${stored.method}) on ${data.name}.`);
    } catch (error) {
      progress.hidden = true;
      progressText.textContent = "";
      submit.disabled = false;
      failed(error);
    }
  });
  section.append(el("h3", {}, "Fit a new version from a file"), form, el("p", {}, progress, " ", progressText));
}

// ------------------------------------------------------------------------------------------ start

document.getElementById("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("key-input");
  api.setKey(input.value.trim(), document.getElementById("key-remember").checked);
  input.value = "";
  try {
    await refreshSession();
    await route();
  } catch (error) {
    failed(error);
  }
});

document.getElementById("key-forget").addEventListener("click", async () => {
  api.setKey(null, false);
  try {
    await refreshSession();
    await route();
  } catch (error) {
    failed(error);
  }
});

document.getElementById("key-remember").addEventListener("change", (event) => {
  if (api.currentKey()) api.setKey(api.currentKey(), event.target.checked);
});

try {
  await refreshSession();
  await route();
} catch (error) {
  failed(error);
}
