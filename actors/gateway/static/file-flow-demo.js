// The demo page: submit a conversion, follow its events (EventSource), show the live figures.
"use strict";

const STATS_EVERY_MS = 3000;  // how often the figures refresh while the page is open
const STAGES = ["preparing", "converting", "verifying", "finishing"];
const $ = (id) => document.getElementById(id);
let formats = [];
let source = null;

function apiKey() { return $("api-key").value.trim(); }

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function withToken(path) {
  const key = apiKey();
  return key ? `${path}${path.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(key)}` : path;
}

function bytes(n) {
  if (n === null || n === undefined) return "n/a here";
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n / 1024, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(2)} ${units[unit]}`;
}

function rate(r) { return r === null || r === undefined ? "no sample yet" : `${(r * 100).toFixed(1)} %`; }

async function loadFormats() {
  const response = await fetch("/api/formats");
  formats = (await response.json()).formats;
  $("format").innerHTML = formats.map((f) => `<option value="${f.format}">${f.format}${f.video ? " (video)" : ""}</option>`).join("");
  $("format").value = "mp3";
  fillQualities();
}

function fillQualities() {
  const f = formats.find((x) => x.format === $("format").value);
  if (!f) return;
  $("quality").innerHTML = f.qualities.map((q) => `<option value="${q}">${q}${q === f.default_quality ? " (default)" : ""}</option>`).join("");
  $("quality").value = f.default_quality;
}

function showProgress(stage, percent, detail) {
  $("bar-fill").style.width = `${percent}%`;
  $("bar").setAttribute("aria-valuenow", String(percent));
  $("percent").textContent = `${Math.round(percent)} %`;
  $("stage").textContent = stage;
  $("detail").textContent = detail ? `— ${detail}` : "";
  const at = STAGES.indexOf(stage);
  document.querySelectorAll("#stages li").forEach((li, i) => {
    li.classList.toggle("active", i === at);
    li.classList.toggle("done", stage === "completed" || (at >= 0 && i < at));
  });
}

function finish() {
  if (source) { source.close(); source = null; }
  $("submit").disabled = false;
  refreshStats();
}

// An event's link is followed only when it is http(s): never javascript:, data: or anything else.
function httpLink(value) {
  try {
    const url = new URL(value, window.location.href);
    return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
  } catch (_) {
    return null;
  }
}

function follow(jobId) {
  source = new EventSource(withToken(`/api/jobs/${jobId}/events`));
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    showProgress(p.stage, p.percent, p.detail);
  });
  source.addEventListener("completed", (e) => {
    const done = JSON.parse(e.data);
    showProgress("completed", 100, "");
    const link = httpLink(done.download_url);
    $("download-link").href = link || "#";
    $("download-link").hidden = !link;
    $("download-link").textContent = `Download ${done.title || done.key.split("/").pop()}`;
    $("result-facts").textContent = ` ${bytes(done.size)}, ${done.duration.toFixed(1)} s, ` +
      `processed in ${(done.timings.total || 0).toFixed(2)} s`;
    $("result").hidden = false;
    finish();
  });
  source.addEventListener("failed", (e) => {
    const failed = JSON.parse(e.data);
    $("stage").textContent = "failed";
    $("error").textContent = `${failed.error.code}: ${failed.error.message}`;
    $("error").hidden = false;
    finish();
  });
}

async function submit(event) {
  event.preventDefault();
  $("submit").disabled = true;
  $("job").hidden = false;
  $("result").hidden = true;
  $("error").hidden = true;
  showProgress("queued", 0, "");
  const body = { url: $("url").value, format: $("format").value, quality: $("quality").value };
  const response = await fetch("/api/convert", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (response.status !== 202) {
    $("error").textContent = `${answer.error.code}: ${answer.error.message}` +
      (answer.error.field ? ` (${answer.error.field})` : "");
    $("error").hidden = false;
    $("submit").disabled = false;
    return;
  }
  $("job-id").textContent = answer.job_id;
  follow(answer.job_id);
}

async function refreshStats() {
  try {
    const response = await fetch("/api/storage/stats", { headers: headers() });
    if (!response.ok) { $("stats-updated").textContent = `(stats: HTTP ${response.status})`; return; }
    const s = await response.json();
    $("coordinator-bytes").textContent = bytes(s.data_path.coordinator_file_bytes);
    $("streamed-bytes").textContent = bytes(s.data_path.uploader_bytes_streamed ?? s.data_path.completed_bytes);
    $("stored-objects").textContent = `${s.storage.objects} (${bytes(s.storage.bytes)})`;
    $("jobs").textContent = `${s.counts.completed} / ${s.counts.failed}`;
    $("rate-presign").textContent = rate(s.rates.presigned_url_success_rate);
    $("rate-upload").textContent = rate(s.rates.direct_upload_success_rate);
    $("rate-verify").textContent = rate(s.rates.verification_pass_rate);
    $("avg-time").textContent = s.rates.average_processing_seconds === null ? "no sample yet"
      : `${s.rates.average_processing_seconds.toFixed(2)} s`;
    $("open-uploads").textContent = String(s.storage.open_uploads);
    $("stats-updated").textContent = `(updated ${new Date().toLocaleTimeString()})`;
  } catch (err) {
    $("stats-updated").textContent = `(stats unavailable: ${err})`;
  }
}

$("format").addEventListener("change", fillQualities);
$("convert-form").addEventListener("submit", submit);
loadFormats();
refreshStats();
setInterval(refreshStats, STATS_EVERY_MS);
