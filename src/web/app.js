"use strict";
// The page's script (src/web/index.html): the drawing pad and the layers, then the live run.
(function () {
  const $ = (id) => document.getElementById(id);
  const pad = $("pad"), pen = pad.getContext("2d");
  const state = {
    model: null, strokes: [], current: null, drawVersion: 0, renderedVersion: 0, clearedAt: 0,
    inflight: false, lastSent: 0, prediction: null, answers: 0, errors: 0, lastAnswer: null, perMap: false,
  };
  // For tests and the curious: window.numpyCnn.idle() is true once the last drawing has its answer on screen.
  window.numpyCnn = {
    state,
    idle: () => !state.inflight && state.renderedVersion === state.drawVersion,
    prediction: () => state.prediction,
    ask: () => predict(), show: (answer) => show(answer, 0), hasDrawing: () => state.strokes.length > 0,
  };

  // ---- colour scales: 256 RGB entries each --------------------------------------------------------------
  function ramp(stops) {
    const table = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = i / 255;
      let k = 0;
      while (k < stops.length - 2 && t > stops[k + 1][0]) k++;
      const [t0, c0] = stops[k], [t1, c1] = stops[k + 1];
      const f = Math.min(1, Math.max(0, (t - t0) / (t1 - t0)));
      for (let j = 0; j < 3; j++) table[3 * i + j] = c0[j] + f * (c1[j] - c0[j]);
    }
    return table;
  }
  // Above-zero-only layers (after ReLU, pooling): black to purple to orange to pale yellow (like "inferno").
  const SEQUENTIAL = ramp([[0, [0, 0, 4]], [0.25, [87, 16, 110]], [0.5, [188, 55, 84]], [0.75, [249, 142, 9]],
                           [1, [252, 255, 164]]]);
  // Layers with signs (convolutions, dense): blue below zero, black at zero, orange above.
  const DIVERGING = ramp([[0, [165, 223, 255]], [0.25, [37, 99, 235]], [0.5, [5, 8, 18]], [0.75, [234, 88, 12]],
                          [1, [254, 240, 138]]]);
  function rampCss(table) {
    const stops = [];
    for (let i = 0; i <= 8; i++) {
      const k = Math.round(i * 255 / 8);
      stops.push(`rgb(${table[3 * k]},${table[3 * k + 1]},${table[3 * k + 2]}) ${i * 12.5}%`);
    }
    return `linear-gradient(90deg, ${stops.join(",")})`;
  }
  $("ramp-div").style.background = rampCss(DIVERGING);
  $("ramp-seq").style.background = rampCss(SEQUENTIAL);
  // Where a value v, as a fraction of the layer's largest magnitude, sits in its table: a signed layer maps
  // -1 … 1 onto the diverging scale, an above-zero one 0 … 1 onto the sequential scale.
  const rampIndex = (v, signed) => 3 * Math.max(0, Math.min(255, Math.round(signed ? (v + 1) * 127.5 : v * 255)));
  const css = (table, t) => { const k = 3 * Math.round(Math.max(0, Math.min(1, t)) * 255);
    return `rgb(${table[k]},${table[k + 1]},${table[k + 2]})`; };
  // The page's colours, read from the CSS variables of index.html so that the canvases match the styles.
  const style = getComputedStyle(document.documentElement);
  const COLOUR = Object.fromEntries(["accent", "pos", "neg", "muted", "axis"].map(
    (name) => [name, style.getPropertyValue("--" + name).trim()]));

  // ---- small helpers ----------------------------------------------------------------------------------
  const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text; return e; };
  const fmt = (v) => Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
  const times = (shape) => shape.join(" × ");
  function decode(layer) {
    const text = atob(layer.values), bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }
  function sharpCanvas(cssWidth, cssHeight) {
    const c = el("canvas"), ratio = window.devicePixelRatio || 1;
    c.width = Math.round(cssWidth * ratio); c.height = Math.round(cssHeight * ratio);
    c.style.width = cssWidth + "px"; c.style.height = cssHeight + "px";
    const g = c.getContext("2d"); g.scale(ratio, ratio);
    return [c, g];
  }

  // ---- what each kind of layer does, in one sentence ----------------------------------------------------
  function note(type, shape, index, count) {
    const last = index === count - 1;
    const n = shape.length === 3 ? shape[2] : shape[0];
    switch (type) {
      case "Conv2D": return `${n} filters, each slid over its input: a map is bright (orange) where its filter's ` +
        "pattern is found, blue where the opposite is.";
      case "ReLU": return shape.length === 3 ? "Negative values set to 0: only what each filter found survives."
        : "Negative values set to 0.";
      case "MaxPool2D": return "Each window keeps its largest value: smaller maps that keep the strongest responses.";
      case "AvgPool2D": return "Each window's average: smaller, smoother maps.";
      case "BatchNorm":
        return "Each channel shifted and scaled with the statistics learned in training.";
      case "Dropout": return "At prediction time dropout passes everything through unchanged.";
      case "Tanh": return "Every value squashed into −1 … 1.";
      case "Flatten": return `The ${n.toLocaleString()} values above laid out in one row: the input of the dense layer.`;
      case "Dense": return last ? "One score (logit) per class; softmax turns them into the probabilities above."
        : `${n} units, each a weighted sum of every value of the layer before.`;
      default: return "";
    }
  }

  // ---- the model: summary, info, empty layer cards ----------------------------------------------------------
  async function loadModel() {
    let model;
    try {
      const response = await fetch("api/model");
      model = await response.json();
      if (!response.ok) throw new Error(model.error || response.status);
    } catch (error) {
      $("trained").textContent = "cannot reach the server: is python src/main.py --serve still running?";
      return;
    }
    state.model = model;
    showInfo(model);
    showSummary(model);
    buildLayers(model);
    buildProbabilities(model.class_names, null);
    const [h, w] = model.input_shape;
    $("seen").width = w; $("seen").height = h;
    if (model.mode === "picture") showPicturePanel(model);
  }

  // ---- a model of pictures (not digits): a file to drop or choose, and the test images to click ---------------
  function showPicturePanel(model) {
    $("draw-panel").hidden = true; $("picture-panel").hidden = false;
    $("step1").textContent = "Choose a picture";
    document.querySelector(".section-head .sub").textContent =
      "every layer's output for your picture, from the first layer to the answer";
    $("tagline").textContent = "Drop a picture and watch every layer of the network you trained.";
    const [h, w, c] = model.input_shape;
    $("seen-hint").textContent = `The picture as the network gets it: resized to ${h}×${w} pixels, ` +
      (c === 3 ? "in colour (red, green, blue)." : "in grey.");
    const box = $("examples");
    if (!model.examples.length) $("examples-hint").hidden = true;
    for (const example of model.examples) {
      const img = el("img");
      img.src = example.image; img.alt = img.title = example.class;
      img.addEventListener("click", () => {
        for (const other of box.children) other.classList.toggle("on", other === img);
        sendPicture(example.image);
      });
      box.append(img);
    }
    const drop = $("drop");
    drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault(); drop.classList.remove("over");
      if (event.dataTransfer.files.length) readFile(event.dataTransfer.files[0]);
    });
    $("file").addEventListener("change", (event) => { if (event.target.files.length) readFile(event.target.files[0]); });
    $("sure").textContent = "Drop or choose a picture on the left.";
  }

  function readFile(file) {
    const reader = new FileReader();
    reader.onload = () => sendPicture(reader.result);
    reader.onerror = () => showError(`cannot read ${file.name}`);
    reader.readAsDataURL(file);
  }

  async function sendPicture(dataUrl) {
    const version = ++state.drawVersion, started = performance.now();
    state.inflight = true;
    try {
      const response = await fetch("api/predict", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: dataUrl }),
      });
      let answer;
      try { answer = await response.json(); } catch (error) { answer = { error: `HTTP ${response.status}` }; }
      if (version === state.drawVersion) {
        if (response.ok) show(answer, performance.now() - started); else showError(answer.error || response.status);
      }
    } catch (error) {
      showError("cannot reach the server: is python src/main.py --serve still running?");
    } finally {
      state.inflight = false;
      state.renderedVersion = Math.max(state.renderedVersion, version);
    }
  }

  function showInfo(model) {
    const info = model.info || {};
    const dataset = String(info.dataset || "");
    const pretty = { mnist: "MNIST", fashion_mnist: "Fashion-MNIST", digits: "scikit-learn's 8×8 digits",
      synthetic: "synthetic digits", folder: "your own images" }[dataset.toLowerCase()] || dataset || "?";
    const synthetic = String(info.source).toLowerCase() === "synthetic" || dataset.toLowerCase() === "synthetic";
    const accuracy = typeof info.test_accuracy === "number" ? (100 * info.test_accuracy).toFixed(1) + "%" : null;
    const trained = $("trained");
    trained.textContent = "";
    trained.append("trained on ", el("b", "", synthetic ? "synthetic digits" : pretty));
    if (info.source && !synthetic) trained.append(` (${info.source})`);
    if (accuracy) trained.append(" · test accuracy ", el("b", "", accuracy));
    if (info.epochs !== undefined) trained.append(` · ${info.epochs} epoch${info.epochs === 1 ? "" : "s"}`);
    if (synthetic) {
      const banner = $("banner");
      banner.hidden = false;
      banner.textContent = "⚠ This model was trained on synthetic seven-segment digits, not on real handwriting " +
        "(no MNIST files were found when it was trained). It reads digits drawn like a calculator display best; " +
        "train on MNIST (see the README) for handwriting.";
    }
    if (dataset === "fashion_mnist") {
      $("tagline").textContent = "Draw a piece of clothing and watch every layer of the network you trained.";
      $("draw-hint").textContent = "One article (a trouser, a bag, a shoe…), large, filling the pad.";
      $("seen-hint").textContent = "Your drawing as the network gets it: cropped to the ink and scaled to fill " +
        `${model.input_shape[0]}×${model.input_shape[1]} pixels, as Fashion-MNIST's images were made.`;
    } else if (model.input_shape[0] !== 28) {
      $("seen-hint").textContent = `Your drawing as the network gets it: ${model.input_shape[0]}×` +
        `${model.input_shape[1]} pixels, cropped to the ink and centred.`;
    }
    const rows = [
      ["data set", synthetic ? "synthetic digits" : pretty],
      ["source", info.source],
      ["test accuracy", accuracy],
      ["epochs", info.epochs],
      ["training images", typeof info.n_train === "number" ? info.n_train.toLocaleString() : info.n_train],
      ["parameters", (info.parameters || model.parameters).toLocaleString()],
      ["input", times(model.input_shape)],
    ];
    const known = new Set(["dataset", "source", "test_accuracy", "epochs", "n_train", "parameters"]);
    for (const [key, value] of Object.entries(info)) {
      if (!known.has(key) && value !== null && typeof value !== "object") rows.push([key.replace(/_/g, " "), value]);
    }
    const dl = $("info");
    for (const [key, value] of rows) {
      if (value === undefined || value === null || value === "") continue;
      dl.append(el("dt", "", key));
      const dd = el("dd", synthetic && (key === "source" || key === "data set") ? "warn" : "", String(value));
      dl.append(dd);
    }
  }

  function splitLayer(text) {  // "conv2d_1 (Conv2D)" -> ["conv2d_1", "Conv2D"]
    const match = /^(\S+)\s*\(([^)]*)\)/.exec(text);
    return match ? [match[1], match[2]] : [text, ""];
  }

  function showSummary(model) {
    const table = $("summary");
    table.textContent = "";
    const head = table.createTHead().insertRow();
    for (const [text, cls] of [["layer", ""], ["output", ""], ["params", "num"]]) {
      const th = el("th", cls, text); head.append(th);
    }
    const body = table.createTBody();
    model.layers.forEach((row, index) => {
      const [name, type] = splitLayer(row.layer);
      const tr = body.insertRow();
      tr.className = "row";
      tr.title = `${name} (${type}): jump to its output`;
      const cell = tr.insertCell();
      cell.append(name + " ", el("span", "type", type));
      tr.insertCell().textContent = times(row.output_shape);
      const params = tr.insertCell(); params.className = "num"; params.textContent = row.parameters.toLocaleString();
      tr.addEventListener("click", () => document.getElementById("layer-" + index)
        .scrollIntoView({ behavior: "smooth", block: "center" }));
    });
    const foot = table.createTFoot().insertRow();
    const total = foot.insertCell(); total.colSpan = 2; total.textContent = "total";
    const sum = foot.insertCell(); sum.className = "num"; sum.textContent = model.parameters.toLocaleString();
  }

  function buildLayers(model) {
    const box = $("layers");
    box.textContent = "";
    state.cards = model.layers.map((row, index) => {
      const [name, type] = splitLayer(row.layer);
      const shape = row.output_shape;
      const maps = shape.length === 3;
      const card = el("div", "layer " + (maps ? "maps-layer" : "vector"));
      card.id = "layer-" + index;
      card.dataset.name = name;
      const head = el("div", "lhead");
      head.append(el("span", "lnum", String(index + 1).padStart(2, "0")), el("span", "lname", name),
        el("span", "type", type), el("span", "lshape", times(shape) + (maps ? ` · ${shape[2]} maps` : "")));
      const range = el("span", "lrange", "");
      head.append(range);
      card.append(head, el("p", "lnote", note(type, shape, index, model.layers.length)));
      const entry = { card, range, shape, type, name, index, tiles: [], vector: null };
      if (maps) {
        const [h, w, c] = shape;
        const grid = el("div", "maps");
        for (let k = 0; k < c; k++) {
          const tile = el("canvas");
          tile.width = w; tile.height = h;
          tile.title = `${name}, map ${k + 1} of ${c}`;
          grid.append(tile);
          entry.tiles.push(tile);
        }
        card.append(grid);
        entry.grid = grid;
      } else {
        entry.vector = el("div", "vec");
        card.append(entry.vector);
      }
      box.append(card);
      return entry;
    });
    layoutGrids();
  }

  // Feature maps are drawn as large as they can be (whole pixels, at most 112 px, and no larger than the maps of the
  // layers before) while a layer's maps take at most one row per 22 maps; the rows are then made equally long.
  function layoutGrids() {
    let largest = 112;
    for (const entry of state.cards || []) {
      if (!entry.grid) continue;
      const [h, w, count] = entry.shape, room = entry.card.clientWidth - 24 + 4, rowsAllowed = Math.ceil(count / 22);
      let scale = Math.max(1, Math.floor(largest / Math.max(h, w))), fit;
      for (; scale > 1; scale--) {
        fit = Math.floor(room / (w * scale + 4));
        if (fit >= 1 && Math.ceil(count / fit) <= rowsAllowed) break;
      }
      fit = Math.max(1, Math.floor(room / (w * scale + 4)));
      const columns = Math.ceil(count / Math.ceil(count / fit));
      entry.grid.style.gridTemplateColumns = `repeat(${columns}, max-content)`;
      for (const tile of entry.tiles) { tile.style.width = w * scale + "px"; tile.style.height = h * scale + "px"; }
      largest = Math.min(largest, Math.max(h, w) * scale);
    }
  }
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { layoutGrids(); if (state.lastAnswer) drawLayers(state.lastAnswer); }, 150);
  });

  function buildProbabilities(names, probabilities) {
    const box = $("probs");
    if (!box.children.length) {
      state.bars = names.map((name) => {
        const label = el("span", "name", name), bar = el("span", "bar"), fill = el("i"), pct = el("span", "pct", "");
        label.title = name;
        bar.append(fill);
        box.append(label, bar, pct);
        return { label, bar, fill, pct };
      });
    }
    const best = probabilities ? probabilities.reduce((b, p, i) => (p > probabilities[b] ? i : b), 0) : -1;
    state.bars.forEach((row, i) => {
      const p = probabilities ? probabilities[i] : 0;
      row.fill.style.width = (100 * p).toFixed(1) + "%";
      row.pct.textContent = probabilities ? (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%" : "";
      for (const node of [row.label, row.bar, row.pct]) node.classList.toggle("best", i === best);
    });
  }

  // ---- drawing -----------------------------------------------------------------------------------------
  function wipe() { pen.fillStyle = "#000"; pen.fillRect(0, 0, pad.width, pad.height); }
  function point(event) {
    const box = pad.getBoundingClientRect();
    return { x: (event.clientX - box.left) * pad.width / box.width, y: (event.clientY - box.top) * pad.height / box.height };
  }
  function segment(a, b, width) {
    pen.strokeStyle = "#fff"; pen.lineWidth = width; pen.lineCap = "round"; pen.lineJoin = "round";
    pen.beginPath(); pen.moveTo(a.x, a.y); pen.lineTo(b.x, b.y); pen.stroke();
  }
  function redraw() {
    wipe();
    for (const stroke of state.strokes) {
      stroke.points.forEach((p, i) => segment(stroke.points[Math.max(0, i - 1)], p, stroke.width));
    }
  }
  pad.addEventListener("pointerdown", (event) => {
    if (!event.isPrimary || event.button > 0) return;
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    const p = point(event);
    state.current = { width: Number($("pen").value) * pad.width / 280, points: [p] };
    state.strokes.push(state.current);
    segment(p, p, state.current.width);
    state.drawVersion++;
  });
  pad.addEventListener("pointermove", (event) => {
    if (!state.current || !event.isPrimary) return;
    let events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    if (!events.length) events = [event];
    for (const e of events) {
      const points = state.current.points, p = point(e);
      segment(points[points.length - 1], p, state.current.width);
      points.push(p);
    }
    state.drawVersion++;
    if (!state.inflight && performance.now() - state.lastSent > 60) predict();  // live, while drawing
  });
  function endStroke(event) {
    if (!state.current || !event.isPrimary) return;
    state.current = null;
    predict();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  function clearAll() {
    state.strokes = []; state.current = null; redraw();
    state.drawVersion++; state.clearedAt = state.drawVersion; state.renderedVersion = state.drawVersion;
    state.prediction = null;
    showEmpty();
  }
  $("clear").addEventListener("click", clearAll);
  $("undo").addEventListener("click", () => {
    state.strokes.pop(); redraw();
    if (!state.strokes.length) { clearAll(); return; }
    state.drawVersion++; predict();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") clearAll();
    if ((event.ctrlKey || event.metaKey) && event.key === "z") { event.preventDefault(); $("undo").click(); }
  });
  $("scale-layer").addEventListener("click", () => setScale(false));
  $("scale-map").addEventListener("click", () => setScale(true));
  function setScale(perMap) {
    state.perMap = perMap;
    $("scale-layer").classList.toggle("on", !perMap); $("scale-map").classList.toggle("on", perMap);
    if (state.lastAnswer) drawLayers(state.lastAnswer);
  }

  // ---- asking the server ---------------------------------------------------------------------------------
  async function predict() {
    if (state.inflight) return;  // when it comes back, the newest drawing is sent (see finally)
    if (!state.strokes.length) { state.renderedVersion = state.drawVersion; return; }
    const version = state.drawVersion, started = performance.now();
    state.inflight = true; state.lastSent = started;
    try {
      const response = await fetch("api/predict", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image: pad.toDataURL("image/png") }),
      });
      let answer;
      try { answer = await response.json(); } catch (error) { answer = { error: `HTTP ${response.status}` }; }
      if (version > state.clearedAt) {
        if (response.ok) show(answer, performance.now() - started); else showError(answer.error || response.status);
      }
    } catch (error) {
      if (version > state.clearedAt) showError("cannot reach the server: is python src/main.py --serve still running?");
    } finally {
      state.inflight = false;
      state.renderedVersion = Math.max(state.renderedVersion, version);
      if (state.renderedVersion !== state.drawVersion && !state.current) predict();
    }
  }

  function showError(message) {
    state.errors++;
    const status = $("status");
    status.className = "error";
    status.textContent = "⚠ " + message;
  }

  function showEmpty() {
    $("guess").textContent = "?"; $("guess").className = "";
    $("sure").textContent = state.model && state.model.mode === "picture" ? "Drop or choose a picture on the left."
      : "Draw something on the left.";
    $("status").textContent = ""; $("status").className = "";
    if (state.model) buildProbabilities(state.model.class_names, null);
    const seen = $("seen").getContext("2d");
    seen.fillStyle = "#000"; seen.fillRect(0, 0, $("seen").width, $("seen").height);
    for (const entry of state.cards || []) {
      for (const tile of entry.tiles) tile.getContext("2d").clearRect(0, 0, tile.width, tile.height);
      if (entry.vector) entry.vector.textContent = "";
      entry.range.textContent = "";
    }
    state.lastAnswer = null;
  }

  function show(answer, milliseconds) {
    state.answers++;
    state.lastAnswer = answer;
    state.prediction = answer.prediction.class;
    const guess = $("guess");
    guess.textContent = answer.prediction.class;
    guess.className = answer.prediction.class.length > 2 ? "long" : "";
    const p = answer.prediction.probability;
    const sure = $("sure");
    sure.textContent = "";
    sure.append(el("b", "", (100 * p).toFixed(p > 0.995 ? 0 : 1) + "%"), " sure",
      el("br"), p > 0.9 ? "confident" : p > 0.6 ? "fairly sure"
      : state.model.mode === "picture" ? "unsure" : "unsure: try drawing it more clearly");
    buildProbabilities(state.model.class_names, answer.probabilities.map((row) => row.probability));
    $("status").className = "";
    $("status").textContent = `answered in ${Math.round(milliseconds)} ms (the server: ${answer.milliseconds.toFixed(1)} ms)`;
    drawSeen(answer.input);
    drawLayers(answer);
  }

  function drawSeen(input) {
    const canvas = $("seen"), [h, w] = input.shape, g = canvas.getContext("2d");
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const image = g.createImageData(w, h), flat = input.values.flat(2), colour = input.shape.length === 3;
    for (let i = 0; i < h * w; i++) {  // grey: one value a pixel; colour: red, green, blue
      for (let k = 0; k < 3; k++) image.data[4 * i + k] = colour ? flat[3 * i + k] : flat[i];
      image.data[4 * i + 3] = 255;
    }
    g.putImageData(image, 0, 0);
  }

  function drawLayers(answer) {
    answer.layers.forEach((layer, index) => {
      const entry = state.cards[index];
      if (!entry) return;
      const bytes = decode(layer), low = layer.min, step = (layer.max - layer.min) / 255;
      const values = Float32Array.from(bytes, (q) => low + q * step);
      entry.range.textContent = `min ${fmt(layer.min)} · max ${fmt(layer.max)}`;
      if (layer.kind === "maps") drawMaps(entry, layer, values);
      else drawVector(entry, layer, values, index === answer.layers.length - 1);
    });
  }

  function drawMaps(entry, layer, values) {
    const [h, w, c] = layer.shape, size = h * w, signed = layer.min < 0;
    const table = signed ? DIVERGING : SEQUENTIAL;
    const layerLimit = Math.max(-layer.min, layer.max) || 1;
    for (let k = 0; k < c && k < entry.tiles.length; k++) {
      const tile = entry.tiles[k], g = tile.getContext("2d"), image = g.createImageData(w, h), data = image.data;
      let limit = layerLimit, peak = 0;
      for (let i = 0; i < size; i++) peak = Math.max(peak, Math.abs(values[k * size + i]));
      if (state.perMap) limit = peak || 1;
      for (let i = 0; i < size; i++) {
        const t = values[k * size + i] / limit;
        const j = rampIndex(t, signed);
        data[4 * i] = table[j]; data[4 * i + 1] = table[j + 1]; data[4 * i + 2] = table[j + 2]; data[4 * i + 3] = 255;
      }
      g.putImageData(image, 0, 0);
      tile.title = `${layer.name}, map ${k + 1} of ${c}: strongest value ${fmt(peak)}`;
    }
  }

  function drawVector(entry, layer, values, last) {
    const box = entry.vector, n = values.length, names = state.model.class_names;
    const limit = Math.max(-layer.min, layer.max) || 1, signed = layer.min < 0;
    box.textContent = "";
    if (last && n === names.length) {  // the scores of the classes: labelled columns
      const column = Math.max(24, Math.min(84, Math.floor(box.clientWidth / n))), height = 118;
      const zero = signed ? 50 : 96;
      const [canvas, g] = sharpCanvas(column * n, height);
      const best = values.reduce((b, v, i) => (v > values[b] ? i : b), 0);
      g.font = "11px " + getComputedStyle(document.body).fontFamily;
      g.textAlign = "center";
      for (let i = 0; i < n; i++) {
        const v = values[i] / limit, top = v >= 0 ? zero - v * (zero - 6) : zero;
        const bar = v >= 0 ? v * (zero - 6) : -v * (height - 22 - zero);
        g.fillStyle = i === best ? COLOUR.accent : v >= 0 ? COLOUR.pos : COLOUR.neg;
        g.fillRect(i * column + 6, top, column - 12, Math.max(1, bar));
        g.fillStyle = i === best ? COLOUR.accent : COLOUR.muted;
        const label = names[i].length > 7 ? names[i].slice(0, 6) + "…" : names[i];
        g.fillText(label, i * column + column / 2, height - 4);
      }
      g.fillStyle = COLOUR.axis; g.fillRect(0, zero, column * n, 1);
      canvas.title = names.map((name, i) => `${name}: ${values[i].toFixed(2)}`).join("\n");
      box.append(canvas);
    } else if (n <= 512) {  // bars, one per unit, around a zero line
      const width = Math.max(120, Math.min(box.clientWidth, n * 12)), bar = width / n, height = 84;
      const zero = signed ? height / 2 : height - 2;
      const [canvas, g] = sharpCanvas(width, height);
      for (let i = 0; i < n; i++) {
        const v = values[i] / limit;
        g.fillStyle = css(signed ? DIVERGING : SEQUENTIAL, signed ? (v + 1) / 2 : 0.25 + 0.75 * v);
        const length = Math.abs(v) * (signed ? height / 2 - 2 : height - 4);
        g.fillRect(i * bar, v >= 0 ? zero - length : zero, Math.max(1, bar - (bar > 3 ? 1 : 0)), Math.max(length, 0.5));
      }
      g.fillStyle = COLOUR.axis; g.fillRect(0, zero, width, 1);
      canvas.title = `${n} units; the strongest: ${fmt(Math.max(...values.map(Math.abs)))}`;
      box.append(canvas);
    } else {  // a long vector (Flatten): one small square per value, row after row
      const columns = Math.ceil(Math.sqrt(8 * n)), rows = Math.ceil(n / columns);
      const canvas = el("canvas");
      canvas.width = columns; canvas.height = rows;
      canvas.style.width = "100%"; canvas.style.imageRendering = "pixelated";
      const g = canvas.getContext("2d"), image = g.createImageData(columns, rows), table = signed ? DIVERGING : SEQUENTIAL;
      for (let i = 0; i < columns * rows; i++) {
        const v = i < n ? values[i] / limit : 0;
        const j = rampIndex(v, signed);
        image.data[4 * i] = table[j]; image.data[4 * i + 1] = table[j + 1]; image.data[4 * i + 2] = table[j + 2];
        image.data[4 * i + 3] = i < n ? 255 : 0;
      }
      g.putImageData(image, 0, 0);
      canvas.title = `${n.toLocaleString()} values, ${columns} per row`;
      box.append(canvas);
    }
  }

  wipe();
  loadModel().then(showEmpty);
})();

// Watch it learn: when a run is training (python src/main.py --serve without --load-model), GET api/run answers
// and this follows it: api/events (Server-Sent Events: progress, epoch, done), api/control, api/confusion, api/probe.
(function () {
  const $ = (id) => document.getElementById(id);
  const live = { run: null, progress: null, epoch: null, curve: [], history: [], probeAnswers: [], probe: null,
                 updates: 0, done: null, source: null, asking: false };
  window.numpyCnn.live = live;
  // The curves' colours, read from the CSS variables of index.html (the key under the curves uses the same).
  const style = getComputedStyle(document.documentElement), cssVar = (name) => style.getPropertyValue(name).trim();
  const COLOURS = { loss: cssVar("--accent2"), scoredLoss: cssVar("--accent"), accuracy: cssVar("--ok"),
                    scoredAccuracy: cssVar("--pink"), lr: cssVar("--slate"), plot: cssVar("--plot"),
                    line: cssVar("--line"), muted: cssVar("--muted"), bg: cssVar("--bg"),
                    ok: cssVar("--ok"), bad: cssVar("--bad") };
  const withAlpha = (hex, alpha) =>  // "#rrggbb" -> "rgba(r,g,b,alpha)"
    `rgba(${[1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)).join(",")},${alpha})`;
  const bytesOf = (text) => { const raw = atob(text), out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i); return out; };
  const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text; return e; };
  const name = (k) => live.run ? live.run.class_names[k] : String(k);
  const clock = (s) => s === null || s === undefined ? "?" :
    `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;

  function greyCanvas(base64, h, w, cls) {
    const c = el("canvas", cls); c.width = w; c.height = h;
    const g = c.getContext("2d"), image = g.createImageData(w, h), bytes = bytesOf(base64);
    for (let i = 0; i < w * h; i++) {
      image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = bytes[i]; image.data[4 * i + 3] = 255;
    }
    g.putImageData(image, 0, 0);
    return c;
  }
  const top3Text = (top3) => top3.map(([k, p]) => `${name(k)} ${(100 * p).toFixed(0)}%`).join(" · ");

  async function start() {
    let response;
    try { response = await fetch("api/run"); } catch (error) { return; }
    const run = await response.json();
    if (!response.ok || !run.live) return;  // a saved model: nothing is training
    catchUp(run);
    $("live").hidden = false;
    const source = new EventSource("api/events");
    live.source = source;
    source.addEventListener("progress", (e) => onProgress(JSON.parse(e.data)));
    source.addEventListener("epoch", (e) => onEpoch(JSON.parse(e.data)));
    source.addEventListener("done", (e) => { onDone(JSON.parse(e.data)); source.close(); });
    source.addEventListener("error", () => {  // reconnecting: catch up from the snapshot once it is back
      if (!live.done) fetch("api/run").then((r) => r.ok && r.json()).then((run) => run && catchUp(run)).catch(() => {});
    });
  }

  function catchUp(run) {
    live.run = run;
    for (const node of document.querySelectorAll("#live .scored")) node.textContent = run.scored_on;
    live.curve = run.curve.map(([step, loss, accuracy, lr]) => ({ step, loss, accuracy, lr }));
    live.history = run.history.slice();
    buildProbes(run.probes);
    if (run.progress && run.progress.epoch) onProgress(run.progress, true);
    if (run.epoch && run.epoch.confusion) showEpoch(run.epoch);
    if (run.state === "paused") setState("paused");
    if (run.done) onDone(run.done);
  }

  function stepOfEpoch(epoch) {
    const p = live.progress, training = live.run.config.training;
    if (!p) return 0;
    return (epoch - (p.epochs - training.epochs)) * p.n_batches;
  }

  function onProgress(p, quiet) {
    live.progress = p;
    const header = $("trained").firstChild;
    if (header && header.nodeType === Node.TEXT_NODE) header.textContent = live.done ? "trained on " : "training on ";
    live.updates++;
    if (!quiet && p.loss !== null && !live.curve.some((point) => point.step === p.step)) {
      live.curve.push({ step: p.step, loss: p.loss, accuracy: p.epoch_accuracy, lr: p.learning_rate });
    }
    const left = p.seconds_left === null ? "" : ` · ${clock(p.seconds_left)} left`;
    $("live-progress").textContent = `epoch ${p.epoch}/${p.epochs} · batch ${p.batch}/${p.n_batches} · ` +
      `${Math.round(p.images_per_second || 0).toLocaleString()} img/s${left}` +
      (p.loss === null ? "" : ` · loss ${p.loss.toFixed(4)}`);
    $("live-lr").textContent = p.learning_rate === null ? "?" : p.learning_rate.toPrecision(3);
    const total = p.epochs * p.n_batches, done = (p.epoch - 1) * p.n_batches + p.batch;
    $("live-bar").firstElementChild.style.width = (100 * Math.min(1, done / total)).toFixed(1) + "%";
    if (p.paused !== undefined) setState(p.stopping ? "stopping" : p.paused ? "paused" : "training");
    drawCurves();
    drawFilters(p.filters);
    showProbes(p.probes);
    refreshAnswer();
  }

  function onEpoch(e) {
    if (e.row && !live.history.some((row) => row.epoch === e.row.epoch)) live.history.push(e.row);
    onProgress(e);
    fetchEpoch();
  }
  // The confusion matrix and the mistakes are computed when asked for: once per epoch, by the page.
  async function fetchEpoch() {
    if (live.fetchingEpoch) { live.epochAgain = true; return; }
    live.fetchingEpoch = true;
    try {
      const response = await fetch("api/confusion");
      if (response.ok) showEpoch(await response.json());
    } catch (error) { /* the next epoch asks again */ } finally {
      live.fetchingEpoch = false;
      if (live.epochAgain) { live.epochAgain = false; fetchEpoch(); }
    }
  }

  function onDone(d) {
    live.done = d;
    setState("done");
    const accuracy = typeof d.test_accuracy === "number" ? `test accuracy ${(100 * d.test_accuracy).toFixed(2)}%, ` +
      `test loss ${d.test_loss.toFixed(4)}, ` : "";
    $("live-result").textContent = `${d.status}: ${accuracy}training took ${d.seconds.toFixed(1)}s` +
      (d.serving ? " · the page now serves the trained model" : " · the program has stopped");
    for (const id of ["live-pause", "live-resume", "live-stop"]) $(id).hidden = true;  // nothing left to control
    fetch("api/model").then((r) => r.ok && r.json()).then((model) => model && showInfo(model)).catch(() => {});
    const header = $("trained");
    if (header.firstChild && header.firstChild.nodeType === Node.TEXT_NODE) header.firstChild.textContent = "trained on ";
    if (typeof d.test_accuracy === "number" && !live.headerDone) {
      live.headerDone = true;
      header.append(" · test accuracy ", el("b", "", (100 * d.test_accuracy).toFixed(1) + "%"),
        ` · ${d.epochs_completed} epoch${d.epochs_completed === 1 ? "" : "s"}`);
    }
    refreshAnswer();
  }

  function setState(text) {
    const badge = $("live-state");
    badge.textContent = text; badge.className = text;
    $("live-pause").hidden = text === "paused"; $("live-resume").hidden = text !== "paused";
  }

  async function control(action) {
    const response = await fetch("api/control", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ action }) });
    const answer = await response.json();
    if (response.ok) setState(answer.state);
  }
  $("live-pause").addEventListener("click", () => control("pause"));
  $("live-resume").addEventListener("click", () => control("resume"));
  $("live-stop").addEventListener("click", () => control("stop"));

  // The drawing (or the chosen probe) answered again by the newest weights, one request at a time.
  async function refreshAnswer() {
    if (window.numpyCnn.hasDrawing()) { live.probe = null; markProbe(); window.numpyCnn.ask(); return; }
    if (live.probe === null || live.asking) return;
    live.asking = true;
    try {
      const response = await fetch(`api/probe?index=${live.probe}`);
      const answer = await response.json();
      if (response.ok && live.probe !== null && !window.numpyCnn.hasDrawing()) {
        window.numpyCnn.show(answer);
        $("status").textContent = `test image ${answer.test_index}, a ${name(answer.label)}: answered by the ` +
          (live.done ? "trained model" : `weights of batch ${live.progress.step}`);
      }
    } finally { live.asking = false; }
  }

  function drawCurves() {
    const canvas = $("live-curves"), g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
    const p = live.progress;
    g.fillStyle = COLOURS.plot; g.fillRect(0, 0, w, h);
    if (!p) return;
    // The run so far fills most of the width: the axis grows with it, up to the whole run.
    const reached = Math.max(p.n_batches, ...live.curve.map((c) => c.step), stepOfEpoch(p.epoch - 1) + p.batch);
    const total = live.done ? reached : Math.min(p.epochs * p.n_batches, Math.ceil(reached * 1.15));
    const left = 34, right = w - 34, top = 8, bottom = h - 18;
    const x = (step) => left + (right - left) * step / total;
    const scored = live.run.scored_on;
    const losses = live.curve.map((c) => c.loss).concat(live.history.map((r) => r[scored + "_loss"]))
      .filter((v) => typeof v === "number");
    const lossTop = Math.max(0.1, ...losses) * 1.05;
    const yLoss = (v) => bottom - (bottom - top) * Math.min(v, lossTop) / lossTop;
    const yAcc = (v) => bottom - (bottom - top) * v;
    g.strokeStyle = COLOURS.line; g.lineWidth = 1; g.font = "10px sans-serif"; g.fillStyle = COLOURS.muted;
    const shownEpochs = Math.ceil(total / p.n_batches), every = Math.ceil(shownEpochs / 20);
    for (let e = every; e <= shownEpochs; e += every) {
      const at = x(e * p.n_batches);
      if (at > right) break;
      g.beginPath(); g.moveTo(at, top); g.lineTo(at, bottom); g.stroke();
    }
    for (const frac of [0, 0.5, 1]) {
      g.beginPath(); g.moveTo(left, yAcc(frac)); g.lineTo(right, yAcc(frac)); g.stroke();
      g.textAlign = "right"; g.fillText((lossTop * frac).toFixed(2), left - 3, yAcc(frac) + 3);
      g.textAlign = "left"; g.fillText(`${100 * frac}%`, right + 3, yAcc(frac) + 3);
    }
    g.textAlign = "center";
    g.fillText(`epochs (a line every ${every}): ${(total / p.n_batches).toFixed(1)} of ${p.epochs} shown`,
      (left + right) / 2, h - 4);
    const line = (points, colour, y, width) => {
      g.strokeStyle = colour; g.lineWidth = width; g.beginPath();
      points.forEach(([step, v], i) => (i ? g.lineTo(x(step), y(v)) : g.moveTo(x(step), y(v))));
      g.stroke();
    };
    const dots = (points, colour, y) => { g.fillStyle = colour;
      for (const [step, v] of points) { g.beginPath(); g.arc(x(step), y(v), 3, 0, 2 * Math.PI); g.fill(); } };
    const rates = live.curve.filter((c) => typeof c.lr === "number"), lrTop = Math.max(1e-12, ...rates.map((c) => c.lr));
    line(rates.map((c) => [c.step, c.lr / lrTop]), COLOURS.lr, yAcc, 1);
    line(live.curve.filter((c) => c.accuracy !== null).map((c) => [c.step, c.accuracy]), COLOURS.accuracy, yAcc, 1.5);
    line(live.curve.map((c) => [c.step, c.loss]), COLOURS.loss, yLoss, 1.5);
    const epochs = live.history.map((r) => [stepOfEpoch(r.epoch), r]);
    line(epochs.map(([s, r]) => [s, r[scored + "_loss"]]), COLOURS.scoredLoss, yLoss, 1);
    dots(epochs.map(([s, r]) => [s, r[scored + "_loss"]]), COLOURS.scoredLoss, yLoss);
    line(epochs.map(([s, r]) => [s, r[scored + "_accuracy"]]), COLOURS.scoredAccuracy, yAcc, 1);
    dots(epochs.map(([s, r]) => [s, r[scored + "_accuracy"]]), COLOURS.scoredAccuracy, yAcc);
  }

  function drawFilters(filters) {
    const canvas = $("live-filters");
    if (!filters) { canvas.hidden = true; return; }
    const [count, kh, kw, channels] = filters.shape, bytes = bytesOf(filters.values);
    const low = filters.min, step = (filters.max - filters.min) / 255;
    const columns = Math.min(count, count <= 32 ? 8 : 16), rows = Math.ceil(count / columns);
    const scale = Math.max(2, Math.floor(Math.min(320 / columns, 160 / rows) / (kw + 1)));
    canvas.width = columns * (kw + 1) * scale; canvas.height = rows * (kh + 1) * scale;
    const g = canvas.getContext("2d");
    g.fillStyle = COLOURS.bg; g.fillRect(0, 0, canvas.width, canvas.height);
    const size = kh * kw * channels;
    for (let f = 0; f < count; f++) {
      const values = Array.from(bytes.subarray(f * size, (f + 1) * size), (q) => low + q * step);
      const limit = Math.max(...values.map(Math.abs)) || 1;
      const ox = (f % columns) * (kw + 1) * scale, oy = Math.floor(f / columns) * (kh + 1) * scale;
      for (let i = 0; i < kh; i++) {
        for (let j = 0; j < kw; j++) {
          const at = (i * kw + j) * channels, shade = (c) => Math.round(127.5 + 127.5 * values[at + c] / limit);
          if (channels === 3) g.fillStyle = `rgb(${shade(0)},${shade(1)},${shade(2)})`;
          else { let sum = 0; for (let c = 0; c < channels; c++) sum += values[at + c];
            const v = Math.round(127.5 + 127.5 * sum / channels / limit); g.fillStyle = `rgb(${v},${v},${v})`; }
          g.fillRect(ox + j * scale, oy + i * scale, scale, scale);
        }
      }
    }
  }

  function buildProbes(probes) {
    const box = $("live-probes");
    if (box.children.length === probes.length) return;
    box.textContent = "";
    const [h, w] = live.run.input_shape;
    live.probeCards = probes.map((probe, k) => {
      const card = el("div", "probe"), label = el("b", "", "?");
      card.title = `test image ${probe.index}, a ${name(probe.label)}`;
      card.append(greyCanvas(probe.image, h, w), el("br"), label);
      card.addEventListener("click", () => {
        live.probe = k; markProbe();
        if (window.numpyCnn.hasDrawing()) document.getElementById("clear").click();
        refreshAnswer();
      });
      box.append(card);
      return { card, label, truth: probe.label };
    });
  }
  function markProbe() { (live.probeCards || []).forEach((c, k) => c.card.classList.toggle("on", k === live.probe)); }
  function showProbes(answers) {
    if (!answers || !live.probeCards) return;
    answers.forEach((top3, k) => {
      const card = live.probeCards[k]; if (!card) return;
      card.label.textContent = `${name(top3[0][0])} ${(100 * top3[0][1]).toFixed(0)}%`;
      card.label.className = top3[0][0] === card.truth ? "" : "wrong";
      card.card.title = `a ${name(card.truth)}: ${top3Text(top3)}`;
    });
  }

  function showEpoch(e) {
    live.epoch = e;
    const table = $("live-confusion"), k = e.confusion.length;
    table.textContent = "";
    const head = table.createTHead().insertRow();
    head.append(el("th", "", "t\\p"));
    for (let j = 0; j < k; j++) head.append(el("th", "", name(j).slice(0, 3)));
    head.append(el("th", "", "acc"));
    const body = table.createTBody();
    e.confusion.forEach((row, i) => {
      const tr = body.insertRow(), total = row.reduce((a, b) => a + b, 0) || 1;
      tr.append(el("th", "", name(i).slice(0, 3)));
      row.forEach((count, j) => {
        const td = tr.insertCell(), share = count / total;
        td.className = "cell"; td.textContent = count || "";
        td.style.background = count === 0 ? "transparent" : i === j ? withAlpha(COLOURS.ok, 0.25 + 0.75 * share)
          : withAlpha(COLOURS.bad, 0.3 + 0.7 * Math.min(1, 4 * share));
        td.title = `${count} ${name(i)} predicted as ${name(j)}: click to see them`;
        td.addEventListener("click", () => showCell(i, j));
      });
      tr.append(el("td", "acc", (100 * e.per_class_accuracy[i]).toFixed(0) + "%"));
    });
    const box = $("live-mistakes"), [h, w] = live.run.input_shape;
    box.textContent = "";
    for (const m of e.mistakes) {
      const thumb = el("div", "thumb");
      thumb.title = `${live.run.scored_on} image ${m.index}: a ${name(m.true)}, answered ${top3Text(m.top3)}`;
      thumb.append(greyCanvas(m.image, h, w), el("div", "", `a ${name(m.true)}:`),
        ...m.top3.map(([k, p]) => el("div", k === m.true ? "right" : "", `${name(k)} ${(100 * p).toFixed(0)}%`)));
      box.append(thumb);
    }
  }

  async function showCell(truth, predicted) {
    const response = await fetch(`api/confusion?true=${truth}&predicted=${predicted}`), cell = await response.json();
    const box = $("live-cell");
    box.textContent = "";
    if (!response.ok) { box.textContent = cell.error; return; }
    box.append(el("div", "hint", `${cell.count} ${name(truth)} answered ${name(predicted)}` +
      (cell.count > 24 ? " (the first 24)" : "") + ":"));
    const [h, w] = cell.shape;
    for (const image of cell.images.slice(0, 24)) {
      const thumb = el("div", "thumb");
      thumb.title = `${top3Text(image.top3)}`;
      thumb.append(greyCanvas(image.image, h, w), top3Text(image.top3.slice(0, 1)));
      box.append(thumb);
    }
  }

  start();
})();
