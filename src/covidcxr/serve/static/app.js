// covidcxr upload page: plain JavaScript, no libraries, nothing from the network.
// Server text is only ever inserted with textContent (never innerHTML).
"use strict";

function $(id) { return document.getElementById(id); }

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { "Authorization": "Bearer " + token } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  document.body.dataset.state = "error";
}

function fmt(value, digits) {
  return (value === null || value === undefined) ? "–" : Number(value).toFixed(digits);
}

async function loadModelCard() {
  try {
    const health = await (await fetch("/health")).json();
    if (health.auth_required) { $("token-row").hidden = false; }
    const response = await fetch("/model", { headers: authHeaders() });
    const card = await response.json();
    if (!response.ok) {
      $("model-summary").textContent = "Model card: " + (card.detail || response.status);
      return;
    }
    const seen = (card.sources_seen || []).join(", ") || "unknown";
    const auc = card.metrics && card.metrics.test && card.metrics.test.auc;
    // A shipped model chosen by name (or by default) says so first (covidcxr.zoo.select).
    let text = (card.selected ? card.selected[0].toUpperCase() + card.selected.slice(1) + ". " : "") + "Model " + card.name + " (" + card.model.name + ", " + card.task + "), trained on sources: " + seen;
    if (auc !== undefined) { text += "; test AUC " + fmt(auc, 3) + " (sources seen in training)"; }
    const unseen = card.evaluation && card.evaluation.unseen && card.evaluation.unseen.auc;
    if (unseen && unseen.estimate !== null) { text += "; unseen sources AUC " + fmt(unseen.estimate, 3); }
    if (card.audit) {
      text += "; shortcut audit: " + (card.audit.verdict || "done") + " (" + card.audit.shortcuts + " shortcut finding(s), " + card.audit.warnings + " warning(s))";
    } else {
      text += "; not audited for shortcuts";
    }
    $("model-summary").textContent = text + ". Engine: " + card.engine + ".";
    renderModelFacts(card);
    $("model-card-json").textContent = JSON.stringify(card, null, 2);
  } catch (err) {
    $("model-summary").textContent = "Model card unavailable: " + err;
  }
}

function fillList(id, items) {
  const list = $(id);
  list.replaceChildren();
  for (const item of items) {
    const li = document.createElement("li");
    li.textContent = item;
    list.appendChild(li);
  }
}

function renderModelFacts(card) {
  const summary = card.summary;
  if (!summary) { return; }
  $("card-trained-on").textContent = summary.trained_on;
  fillList("card-performance", summary.performance || []);
  $("card-audit").textContent = summary.audit;
  $("card-operating-point").textContent = summary.operating_point;
  fillList("card-not-for", summary.not_for || []);
  const abstention = card.abstention || {};
  const always = abstention.every_prediction_abstains_because || [];
  const note = $("model-abstains");
  if (abstention.enabled === false) {
    note.textContent = "Abstention is OFF on this service (research use only): decisions are given even for images and models that fail the checks.";
    note.hidden = false;
  } else if (always.length) {
    note.textContent = "Every prediction of this model abstains: " + always.map((r) => r.sentence.replace(/\.$/, "")).join("; ") + ".";
    note.hidden = false;
  }
  $("model-facts").hidden = false;
}

function renderAbstention(result) {
  const abstained = result.decision === "abstain";
  const box = $("abstain-box");
  const list = $("abstain-reasons");
  list.replaceChildren();
  for (const reason of result.abstain_reasons || []) {
    const li = document.createElement("li");
    li.dataset.code = reason.code;
    const strong = document.createElement("strong");
    strong.textContent = reason.code.replace(/_/g, " ") + ": ";
    li.append(strong, document.createTextNode(reason.sentence));
    list.appendChild(li);
  }
  box.hidden = !abstained;
  $("abstention-off").hidden = result.abstention !== "off";
  $("decision").classList.toggle("abstained", abstained);
  $("probability-note").textContent = abstained ? "— not to be acted on (the model alone would say " + result.model_decision + ")" : "";
  $("decision-note").textContent = abstained ? "— do not act on this result"
    : (result.abstention === "off" && (result.abstain_reasons || []).length ? "(abstention off: it would have abstained)" : "");
}

function render(result) {
  $("probability").textContent = fmt(result.probability, 3);
  $("decision").textContent = result.decision;
  renderAbstention(result);
  $("threshold").textContent = result.threshold === null ? "argmax (multi-class)" : fmt(result.threshold, 3);
  const info = result.input;
  $("input-info").textContent = info.format.toUpperCase() + " " + info.width + "×" + info.height + (info.view !== "unknown" ? ", view " + info.view : "");
  const seg = result.segmentation;
  $("lung-info").textContent = "area " + fmt(100 * seg.mask_area_fraction, 0) + "% of the image, left/right balance " + fmt(seg.left_right_balance, 2) + (seg.rejected_reason ? " — rejected: " + seg.rejected_reason : "");
  const ood = result.out_of_distribution;
  $("ood-info").textContent = ood.available ? ("score " + fmt(ood.score, 2) + " (threshold " + fmt(ood.threshold, 2) + ")" + (ood.flagged ? " — unlike the training images" : " — like the training images") + "; nearest training sources: " + ood.nearest_training_sources.join(", ")) : ("unavailable: " + ood.reason);
  const sal = result.saliency;
  $("saliency-info").textContent = sal ? (fmt(100 * sal.lung_focus, 0) + "% of the Grad-CAM map inside the lungs (lungs are " + fmt(100 * sal.lung_area, 0) + "% of the input); explains " + sal.explains) : "not computed";
  const list = $("warnings");
  list.replaceChildren();
  // a reason to abstain is shown once, in the abstention box; with abstention off they stay warnings here
  const reasons = new Set(result.decision === "abstain" ? (result.abstain_reasons || []).map((r) => r.code) : []);
  const others = result.warnings.filter((w) => !reasons.has(w.code));
  if (others.length === 0) {
    const li = document.createElement("li");
    li.className = "none";
    li.textContent = reasons.size ? "No other warnings." : "No warnings.";
    list.appendChild(li);
  }
  for (const warning of others) {
    const li = document.createElement("li");
    li.dataset.code = warning.code;
    li.textContent = warning.message;
    list.appendChild(li);
  }
  for (const name of ["input", "lung_mask", "gradcam"]) {
    const img = $("overlay-" + name);
    const uri = result.overlays[name];
    if (uri && uri.startsWith("data:image/png;base64,")) { img.src = uri; img.parentElement.hidden = false; }
    else { img.removeAttribute("src"); img.parentElement.hidden = true; }
  }
  $("result").hidden = false;
  document.body.dataset.state = "done";
}

async function submit(event) {
  event.preventDefault();
  $("error").hidden = true;
  const file = $("file").files[0];
  if (!file) { showError("Choose an image first."); return; }
  const form = new FormData();
  form.append("file", file);
  $("submit").disabled = true;
  $("status").textContent = "Running…";
  document.body.dataset.state = "busy";
  try {
    const response = await fetch("/predict?gradcam=" + ($("gradcam").checked ? "true" : "false"), {
      method: "POST", body: form, headers: authHeaders(),
    });
    let body;
    try { body = await response.json(); } catch (err) { body = { error: "bad_response", detail: String(response.status) }; }
    if (!response.ok) {
      $("result").hidden = true;
      showError("Refused (" + response.status + " " + body.error + "): " + body.detail);
    } else {
      render(body);
    }
  } catch (err) {
    showError("Request failed: " + err);
  } finally {
    $("submit").disabled = false;
    $("status").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("upload-form").addEventListener("submit", submit);
  loadModelCard();
});
