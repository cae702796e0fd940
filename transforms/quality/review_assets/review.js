/* S2-NAIP review page: pick the right Sentinel-2 timestep of each listed tile, or drop the tile;
 * in a --lr-timesteps N > 1 build, drop single timesteps of the N written.
 *
 * Static and self-contained: data.js sets window.S2NAIP_REVIEW, images are relative files, so the
 * page works from file:// and from a bucket. Decisions are kept in localStorage (per review id) and
 * exported as corrections.json for `s2naip build --corrections`: {tile_id: lr_index} (a pick),
 * {tile_id: null} (drop the tile) or {tile_id: {"drop": [t, ...]}} (drop those written timesteps;
 * the next acceptable ones take their places). One decision per tile: a pick replaces drops and
 * the other way round.
 */
(function () {
  "use strict";

  var data = window.S2NAIP_REVIEW;
  var tiles = (data && data.tiles) || [];
  var storageKey = "s2naip-review:" + ((data && data.id) || "default");
  var state = { decisions: {}, position: 0, nir: false };
  var listItems = [];

  // ------------------------------------------------------------------------------------------
  // Saved state

  function load() {
    try {
      var saved = JSON.parse(window.localStorage.getItem(storageKey) || "null");
      if (saved && typeof saved === "object") {
        state.decisions = saved.decisions || {};
        state.position = Math.min(Math.max(saved.position | 0, 0), Math.max(tiles.length - 1, 0));
      }
    } catch (e) { /* storage unavailable: decisions live until the page is closed */ }
  }

  function save() {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify({
        decisions: state.decisions, position: state.position, saved: new Date().toISOString()
      }));
    } catch (e) { /* see load() */ }
  }

  function hasDecision(tile) {
    return Object.prototype.hasOwnProperty.call(state.decisions, tile.tile_id);
  }

  function isDrops(value) {
    return value !== null && typeof value === "object" && Array.isArray(value.drop);
  }

  function droppedSteps(tile) {
    var value = hasDecision(tile) ? state.decisions[tile.tile_id] : undefined;
    return isDrops(value) ? value.drop : [];
  }

  function written(tile) {
    return tile.lr_indices || [tile.lr_index];
  }

  function corrections() {
    var out = {};
    tiles.forEach(function (tile) {
      if (hasDecision(tile)) out[tile.tile_id] = state.decisions[tile.tile_id];
    });
    return out;
  }

  // ------------------------------------------------------------------------------------------
  // Formatting and DOM helpers

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "\u221e";
    return Number(value).toFixed(digits);
  }

  function metricText(value) {
    if (value === null || value === undefined) return "\u2013";
    return data.metric.indexOf("psnr") === 0 ? fmt(value, 2) + " dB" : fmt(value, 4);
  }

  function keyLabel(position) {
    return position < 9 ? String(position + 1) : position === 9 ? "0" : "";
  }

  /* One timestep of a vertical sprite (n frames of 32x32), scaled with nearest neighbour. */
  function sprite(src, position, frames, size, alt) {
    var box = el("div", "sprite");
    box.style.width = size + "px";
    box.style.height = size + "px";
    var img = el("img");
    img.src = src;
    img.alt = alt;
    img.width = size;
    img.height = size * frames;
    img.style.top = (-position * size) + "px";
    img.draggable = false;
    box.appendChild(img);
    return box;
  }

  function bigImage(src, caption) {
    var fig = el("figure");
    var img = el("img", "big pixelated");
    img.src = src;
    img.alt = caption;
    fig.appendChild(img);
    fig.appendChild(el("figcaption", null, caption));
    return fig;
  }

  function bigSprite(src, position, frames, caption) {
    var fig = el("figure");
    fig.appendChild(sprite(src, position, frames, 256, caption));
    fig.appendChild(el("figcaption", null, caption));
    return fig;
  }

  // ------------------------------------------------------------------------------------------
  // Rendering

  function buildList() {
    var nav = document.getElementById("tile-list");
    tiles.forEach(function (tile, i) {
      var item = el("div", "item");
      item.dataset.index = String(i);
      item.title = tile.tile_id;
      item.appendChild(el("span", "rank", "#" + tile.rank));
      var name = el("span", "name");
      var parts = tile.tile_id.split("/");
      name.appendChild(el("b", null, parts[parts.length - 1]));
      if (parts.length > 1) name.appendChild(el("small", null, " " + parts[0]));
      item.appendChild(name);
      item.appendChild(el("span", "value", metricText(tile.value)));
      item.appendChild(el("span", "status"));
      item.addEventListener("click", function () { go(i); });
      nav.appendChild(item);
      listItems.push(item);
    });
  }

  function updateList() {
    listItems.forEach(function (item, i) {
      var tile = tiles[i];
      var decided = hasDecision(tile);
      var value = decided ? state.decisions[tile.tile_id] : undefined;
      var dropped = decided && value === null;
      var drops = isDrops(value);
      item.classList.toggle("current", i === state.position);
      item.classList.toggle("picked", decided && !dropped && !drops);
      item.classList.toggle("dropped", dropped);
      item.classList.toggle("step-drops", drops);
      item.querySelector(".status").textContent =
        !decided ? "" : dropped ? "\u2717" : drops ? "\u2212" + value.drop.length : "t" + value;
    });
    var current = listItems[state.position];
    if (current && current.scrollIntoView) current.scrollIntoView({ block: "nearest" });
  }

  function updateProgress() {
    var done = tiles.filter(hasDecision).length;
    document.getElementById("progress-fill").style.width =
      (tiles.length ? (100 * done) / tiles.length : 0) + "%";
    document.getElementById("progress-text").textContent =
      done + " / " + tiles.length + " reviewed \u00b7 tile " +
      (tiles.length ? state.position + 1 : 0) + " of " + tiles.length;
  }

  function renderTile() {
    var main = document.getElementById("tile");
    var tile = tiles[state.position];
    main.textContent = "";
    if (!tile) {
      var empty = el("p", null, "No tile to review.");
      empty.id = "empty";
      main.appendChild(empty);
      return;
    }
    var frames = tile.steps.length;
    var builtPos = -1;
    tile.steps.forEach(function (s, i) { if (s.t === tile.lr_index) builtPos = i; });
    var decided = hasDecision(tile);
    var decision = decided ? state.decisions[tile.tile_id] : undefined;
    var nirGrid = state.nir && data.bands >= 4;

    var head = el("div", "tile-head");
    head.appendChild(el("h1", null, "#" + tile.rank + "  " + tile.tile_id));
    var facts = el("div", "facts");
    [[data.metric_label, metricText(tile.value)], ["built choice", "t=" + tile.lr_index + " (" + tile.selection + ")"],
     ["valid timesteps", tile.n_valid + " of " + tile.n_timesteps]].concat(
      written(tile).length > 1 || data.lr_timesteps > 1 ? [["written", written(tile).length + (data.lr_timesteps ?
        " of " + data.lr_timesteps + " requested" : "")]] : []).forEach(function (f) {
      var span = el("span", null, f[0] + " ");
      span.appendChild(el("b", null, f[1]));
      facts.appendChild(span);
    });
    head.appendChild(facts);
    var drops = isDrops(decision);
    var badge = el("span", "decision" + (decided ? (decision === null ? " dropped" : drops ? " step-drops" : " picked") : ""),
      !decided ? "no decision" : decision === null ? "dropped" : drops ? "dropped t=" + decision.drop.join(", t=") +
        " of " + written(tile).length + " written" : "picked t=" + decision);
    badge.id = "decision";
    head.appendChild(badge);
    main.appendChild(head);

    var views = el("div", "views");
    views.appendChild(bigImage(tile.dir + "/hr_rgb.png", "NAIP RGB (original)"));
    if (data.bands >= 4) views.appendChild(bigImage(tile.dir + "/hr_nir.png", "NAIP NIR"));
    // the Sentinel-2 timestep of the current decision: the reviewer's pick, else the built choice
    var shownPos = builtPos;
    var what = "built choice t=" + tile.lr_index;
    if (decided && decision !== null && !drops && decision !== tile.lr_index) {
      tile.steps.forEach(function (s, i) { if (s.t === decision) shownPos = i; });
      what = "your pick t=" + decision + " (built t=" + tile.lr_index + ")";
    }
    if (shownPos >= 0) {
      views.appendChild(bigSprite(tile.dir + "/series_rgb.png", shownPos, frames, "Sentinel-2 " + what));
      if (data.bands >= 4) views.appendChild(bigSprite(tile.dir + "/series_nir.png", shownPos, frames, "B08, " + what));
    }
    if (tile.prediction) views.appendChild(bigImage(tile.dir + "/prediction.png", "prediction (super-resolved)"));
    main.appendChild(views);

    if (written(tile).length > 1) main.appendChild(writtenStrip(tile, frames, nirGrid));

    var buttons = el("div", "buttons");
    var keep = el("button", "keep", "Keep t=" + tile.lr_index + " (Enter)");
    keep.id = "keep";
    keep.addEventListener("click", function () { decide(tile.lr_index); });
    var drop = el("button", "drop", "Drop tile (x)");
    drop.id = "drop";
    drop.addEventListener("click", function () { decide(null); });
    var undo = el("button", "quiet", "Undo (u)");
    undo.id = "undo";
    undo.addEventListener("click", undoDecision);
    buttons.appendChild(keep);
    buttons.appendChild(drop);
    buttons.appendChild(undo);
    main.appendChild(buttons);

    var h2 = el("h2", null, "Valid timesteps by PSNR ");
    h2.appendChild(el("small", null, "(" + (nirGrid ? "B08" : "RGB") + "; n toggles; \u2605 = top-k candidate, " +
      "blue = built choice, green = your pick; PSNR vs the downsampled NAIP, score lower is better)"));
    main.appendChild(h2);
    var grid = el("div", "grid");
    grid.id = "grid";
    tile.steps.forEach(function (s, i) {
      var cell = el("div", "cell");
      cell.dataset.t = String(s.t);
      if (s.t === tile.lr_index) cell.classList.add("built");
      if (decided && decision === s.t) cell.classList.add("picked");
      if (droppedSteps(tile).indexOf(s.t) >= 0) cell.classList.add("step-dropped");
      cell.title = "timestep " + s.t + ": click to pick";
      cell.appendChild(sprite(tile.dir + (nirGrid ? "/series_nir.png" : "/series_rgb.png"), i, frames, 128,
        "timestep " + s.t));
      var label = el("div", "label");
      var left = el("span");
      var key = keyLabel(i);
      if (key) left.appendChild(el("span", "key", key));
      left.appendChild(document.createTextNode("t=" + s.t));
      label.appendChild(left);
      label.appendChild(el("span", null, fmt(s.psnr, 1) + " dB"));
      cell.appendChild(label);
      var badges = el("div", "badges");
      badges.appendChild(el("span", null, "score " + fmt(s.score, 3) + " "));
      if (s.candidate) badges.appendChild(el("span", "badge-cand", "\u2605 "));
      if (s.t === tile.lr_index) badges.appendChild(el("span", "badge-built", "built"));
      else if (s.written !== undefined) badges.appendChild(el("span", "badge-cand", " written #" + (s.written + 1)));
      if (s.flags && s.flags.length) {
        var flags = el("div", "badge-flags", s.flags.join(", "));
        flags.title = "robust selection evidence beyond its tolerances";
        badges.appendChild(flags);
      }
      cell.appendChild(badges);
      cell.addEventListener("click", function () { decide(s.t); });
      grid.appendChild(cell);
    });
    main.appendChild(grid);
  }

  /* The N written timesteps of a multi-timestep pair, best first, each with its drop toggle. */
  function writtenStrip(tile, frames, nirGrid) {
    var box = el("section", "written");
    box.id = "written";
    var h2 = el("h2", null, "Written timesteps, best first ");
    h2.appendChild(el("small", null, "(Shift+1\u2026" + Math.min(written(tile).length, 9) + " or the \u2715 drops one: " +
      "the next acceptable timestep takes its place; dropping #1 makes the next one the choice)"));
    box.appendChild(h2);
    var strip = el("div", "strip");
    var dropped = droppedSteps(tile);
    written(tile).forEach(function (t, k) {
      var position = -1;
      tile.steps.forEach(function (s, i) { if (s.t === t) position = i; });
      var cell = el("div", "wcell");
      cell.dataset.t = String(t);
      var isDropped = dropped.indexOf(t) >= 0;
      if (isDropped) cell.classList.add("dropped");
      if (position >= 0) {
        cell.appendChild(sprite(tile.dir + (nirGrid ? "/series_nir.png" : "/series_rgb.png"), position, frames, 96,
          "written #" + (k + 1) + ", timestep " + t));
      }
      var label = el("div", "label");
      var left = el("span");
      if (k < 9) left.appendChild(el("span", "key", "\u21e7" + (k + 1)));
      left.appendChild(document.createTextNode("#" + (k + 1) + " t=" + t));
      label.appendChild(left);
      var toggle = el("button", "step-drop" + (isDropped ? " on" : ""), isDropped ? "\u21ba" : "\u2715");
      toggle.title = isDropped ? "keep timestep " + t : "drop timestep " + t;
      toggle.addEventListener("click", function (event) { event.stopPropagation(); toggleDrop(t); });
      label.appendChild(toggle);
      cell.appendChild(label);
      strip.appendChild(cell);
    });
    box.appendChild(strip);
    return box;
  }

  function render() {
    renderTile();
    updateList();
    updateProgress();
  }

  // ------------------------------------------------------------------------------------------
  // Actions

  function go(index) {
    if (!tiles.length) return;
    state.position = Math.min(Math.max(index, 0), tiles.length - 1);
    save();
    render();
  }

  function decide(value) {
    var tile = tiles[state.position];
    if (!tile) return;
    state.decisions[tile.tile_id] = value;
    save();
    if (document.getElementById("auto-advance").checked && state.position < tiles.length - 1) {
      go(state.position + 1);
    } else {
      render();
    }
  }

  /* Drops (or keeps again) one written timestep of the current tile; replaces a pick or a tile drop. */
  function toggleDrop(t) {
    var tile = tiles[state.position];
    if (!tile || written(tile).indexOf(t) < 0) return;
    var drop = droppedSteps(tile).slice();
    var at = drop.indexOf(t);
    if (at >= 0) drop.splice(at, 1); else drop.push(t);
    drop.sort(function (a, b) { return a - b; });
    if (drop.length) state.decisions[tile.tile_id] = { drop: drop };
    else delete state.decisions[tile.tile_id];
    save();
    render();  // no advance: a reviewer may drop several
  }

  function undoDecision() {
    var tile = tiles[state.position];
    if (!tile) return;
    delete state.decisions[tile.tile_id];
    save();
    render();
  }

  function exportCorrections() {
    var text = JSON.stringify(corrections(), null, 2) + "\n";
    var url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
    var a = el("a");
    a.href = url;
    a.download = "corrections.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA") && target.type !== "checkbox") return;
    var tile = tiles[state.position];
    var key = event.key;
    if (event.shiftKey && /^Digit[1-9]$/.test(event.code || "")) {
      if (tile && written(tile).length > 1) {
        var k = Number(event.code.slice(5)) - 1;
        if (k < written(tile).length) toggleDrop(written(tile)[k]);
      }
      event.preventDefault();
      return;
    }
    if (key === "ArrowRight" || key === "j") go(state.position + 1);
    else if (key === "ArrowLeft" || key === "k") go(state.position - 1);
    else if (/^[0-9]$/.test(key) && tile) {
      var position = key === "0" ? 9 : Number(key) - 1;
      if (position < tile.steps.length) decide(tile.steps[position].t);
    } else if ((key === "x" || key === "X") && tile) decide(null);
    else if (key === "Enter" && tile) decide(tile.lr_index);
    else if (key === "u" || key === "Backspace") undoDecision();
    else if (key === "n") { state.nir = !state.nir; renderTile(); }
    else if (key === "e") exportCorrections();
    else return;
    event.preventDefault();
  }

  // ------------------------------------------------------------------------------------------

  function init() {
    load();
    document.getElementById("subtitle").textContent = data
      ? tiles.length + " tiles \u00b7 worst by " + data.metric_label + (data.selection_rule ? " \u00b7 " + data.selection_rule : "")
      : "data.js is missing";
    document.title = "S2-NAIP review \u00b7 " + tiles.length + " tiles";
    document.getElementById("export").addEventListener("click", exportCorrections);
    document.getElementById("clear").addEventListener("click", function () {
      if (window.confirm("Forget every decision of this review?")) { state.decisions = {}; save(); render(); }
    });
    document.addEventListener("keydown", onKey);
    buildList();
    render();
  }

  window.s2naipReview = { corrections: corrections, go: go, state: state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
