// The viewer: posts the dropped files to /v1/series and shows each slice with its tumor mask.
// Plain browser JavaScript, no build step. Masks arrive as COCO RLE (column-major runs, background first).
"use strict";

const OVERLAY_ALPHA = 0.55; // share of the overlay red in a tumor pixel
const FULL_WINDOW = { width: 255, center: 128 }; // on the 8-bit slice: shows it as the models saw it
const state = { files: [], result: null, images: [], index: 0 };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// Kaggle folders hold *_mask images beside the slices: they are answers, not input.
function isSlice(file) {
  return !/_mask\.[^.]+$/i.test(file.name) && !file.name.startsWith(".");
}

async function postSeries(query) {
  const form = new FormData();
  for (const file of state.files) form.append("files", file, file.name);
  const response = await fetch(`/v1/series?${query}`, { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (error) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function decodeRle(rle) {
  const [height, width] = rle.size;
  const mask = new Uint8Array(height * width); // row-major, for the canvas
  let position = 0;
  rle.counts.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let k = position; k < position + run; k++) {
        const x = Math.floor(k / height), y = k % height;
        mask[y * width + x] = 1;
      }
    }
    position += run;
  });
  return mask;
}

function loadImage(base64) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("a slice image could not be shown"));
    image.src = `data:image/png;base64,${base64}`;
  });
}

function formatNumber(value, digits) {
  return value === null || value === undefined ? "n/a" : value.toFixed(digits);
}

// Window/level on the 8-bit slice, the DICOM linear way: [center - width/2, center + width/2] -> 0..255.
function windowLut() {
  const width = Number($("window-width").value), center = Number($("window-center").value);
  $("window-width-value").textContent = width;
  $("window-center-value").textContent = center;
  const lut = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v++) lut[v] = Math.round(((v - center + width / 2) * 255) / width);
  return lut;
}

// mm² per pixel, when the series has a known spacing (DICOM PixelSpacing or the NIfTI header).
function pixelAreaMm2(result) {
  const spacing = result.voxel_spacing;
  return spacing ? spacing.row_mm * spacing.column_mm : null;
}

function showSummary(result) {
  $("slice-count").textContent = result.slice_count;
  $("tumor-slices").textContent = result.tumor_slices;
  $("volume-voxels").textContent = result.tumor_volume_voxels;
  $("volume-ml").textContent = result.tumor_volume_ml === null
    ? "n/a (no DICOM spacing)" : `${result.tumor_volume_ml.toFixed(2)} mL`;
  const spacing = result.voxel_spacing;
  $("spacing").textContent = spacing
    ? `${spacing.row_mm} x ${spacing.column_mm} x ${spacing.slice_mm.toFixed(2)} mm (${spacing.slice_from})` : "n/a";
  $("download-seg").hidden = !result.slices.some((s) => s.sop_instance_uid);
  const slider = $("slice-slider");
  slider.max = result.slice_count - 1;
  $("results").hidden = false;
  document.body.classList.add("has-results");
}

function drawSlice() {
  const result = state.result;
  if (!result) return;
  const slice = result.slices[state.index];
  const image = state.images[state.index];
  const canvas = $("viewer-canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  const lut = windowLut();
  for (let i = 0; i < pixels.data.length; i += 4) {
    pixels.data[i] = lut[pixels.data[i]];
    pixels.data[i + 1] = lut[pixels.data[i + 1]];
    pixels.data[i + 2] = lut[pixels.data[i + 2]];
  }
  if ($("overlay-toggle").checked && slice.mask) {
    const mask = decodeRle(slice.mask);
    for (let p = 0; p < mask.length; p++) {
      if (!mask[p]) continue;
      pixels.data[4 * p] = Math.round((1 - OVERLAY_ALPHA) * pixels.data[4 * p] + OVERLAY_ALPHA * 255);
      pixels.data[4 * p + 1] = Math.round((1 - OVERLAY_ALPHA) * pixels.data[4 * p + 1]);
      pixels.data[4 * p + 2] = Math.round((1 - OVERLAY_ALPHA) * pixels.data[4 * p + 2]);
    }
  }
  context.putImageData(pixels, 0, 0);
  const name = slice.sop_instance_uid ? `SOP ${slice.sop_instance_uid}` : slice.filename || "";
  $("slice-label").textContent = `slice ${state.index + 1} / ${result.slice_count}` + (name ? ` (${name})` : "");
  $("slice-label").title = name;
  $("slice-probability").textContent = formatNumber(slice.tumor_probability, 3);
  $("slice-decision").textContent = slice.tumor_detected ? "tumor detected" : "no tumor detected";
  $("slice-area").textContent = slice.area_pixels;
  const areaMm2 = pixelAreaMm2(result);
  $("slice-area-mm2").textContent = areaMm2 === null
    ? "(mm² n/a: no spacing)" : `= ${(slice.area_pixels * areaMm2).toFixed(1)} mm²`;
  $("slice-volume-ml").textContent = areaMm2 === null
    ? "n/a" : `${((slice.area_pixels * areaMm2 * result.voxel_spacing.slice_mm) / 1000).toFixed(3)} mL`;
  $("slice-slider").value = state.index;
}

async function analyse(files) {
  state.files = files.filter(isSlice);
  if (state.files.length === 0) {
    setStatus("No slice among the dropped files.", true);
    return;
  }
  setStatus(`Analysing ${state.files.length} file(s)...`);
  try {
    const largest = $("largest-component").checked;
    const response = await postSeries(`include_images=true&largest_component=${largest}`);
    const result = await response.json();
    state.images = await Promise.all(result.slices.map((s) => loadImage(s.image)));
    state.result = result;
    // Start where the tumor is largest: the slice a reader wants first.
    const areas = result.slices.map((s) => s.area_pixels);
    state.index = areas.indexOf(Math.max(...areas));
    showSummary(result);
    drawSlice();
    setStatus(`Done: ${result.slice_count} slice(s) in ${Math.round(result.total_ms)} ms, ordered by ${result.ordered_by}.`);
  } catch (error) {
    state.result = null;
    $("results").hidden = true;
    document.body.classList.remove("has-results");
    setStatus(`Could not analyse: ${error.message}`, true);
  }
}

async function downloadSeg() {
  setStatus("Building the DICOM SEG...");
  try {
    const largest = $("largest-component").checked;
    const response = await postSeries(`output=seg&largest_component=${largest}`);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = "tumor-seg.dcm";
    link.click();
    URL.revokeObjectURL(link.href);
    setStatus("DICOM SEG downloaded.");
  } catch (error) {
    setStatus(`Could not build the DICOM SEG: ${error.message}`, true);
  }
}

// Dropped folders are walked (Chromium, Firefox and Safari offer webkitGetAsEntry).
async function filesFromEntry(entry) {
  if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
  const reader = entry.createReader();
  const files = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (batch.length === 0) return files;
    for (const child of batch) files.push(...(await filesFromEntry(child)));
  }
}

async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
  if (entries.length === 0 || entries.some((entry) => !entry)) return [...dataTransfer.files];
  const nested = await Promise.all(entries.map(filesFromEntry));
  return nested.flat();
}

function start() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    analyse(await droppedFiles(event.dataTransfer));
  });
  $("files").addEventListener("change", (event) => analyse([...event.target.files]));
  $("slice-slider").addEventListener("input", (event) => { state.index = Number(event.target.value); drawSlice(); });
  $("overlay-toggle").addEventListener("change", drawSlice);
  $("window-width").addEventListener("input", drawSlice);
  $("window-center").addEventListener("input", drawSlice);
  $("window-reset").addEventListener("click", () => {
    $("window-width").value = FULL_WINDOW.width;
    $("window-center").value = FULL_WINDOW.center;
    drawSlice();
  });
  $("download-seg").addEventListener("click", downloadSeg);
  $("api-key").value = sessionStorage.getItem("lgg-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("lgg-api-key", $("api-key").value.trim()));
}

start();
