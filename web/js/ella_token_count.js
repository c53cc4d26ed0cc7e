// Live token count under the text of every "ELLA Prompt Encode" node.
//
// The count needs the tokenizer of the text encoder actually connected to the node, so the extension follows the
// `text_encoder` link to the "Load ELLA Text Encoder" node, reads its model_name / token_mode / max_length widgets
// (and the `ella` link's connector name, whose recorded token settings win),
// and asks the server (POST /ella/tokenize, nodes/routes.py). Requests are debounced; the server caches tokenizers.
// In fixed mode a prompt longer than max_length is truncated: the widget turns red and shows the dropped words;
// the text wraps and the node grows to show all of it. Until the server answers (the first request for an encoder
// loads its tokenizer, which can take seconds) the widget says it is counting, never that nothing is connected.
// The widget's state is also in `data-state` (pending, ok, over, error, unconnected) for styling and tests.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const ENCODE_NODE = "EllaTSCEncode";
const LOADER_NODE = "EllaTSCTextEncoderLoader";
const CONNECTOR_NODE = "EllaTSCConnectorLoader";
const DEBOUNCE_MS = 350;
const POLL_MS = 700; // catches changes that fire no event (loader widgets, rewiring, loading a workflow)
const MIN_HEIGHT = 22;
const MARGIN = 4;
const COLORS = { ok: "var(--descrip-text, #999)", pending: "var(--descrip-text, #999)", over: "#ff6b6b",
                 error: "#d9a441", unconnected: "#d9a441" };
const seenEncoders = new Set(); // encoders whose tokenizer the server has loaded in this page's lifetime

function getLink(graph, id) {
  if (id == null) return null;
  return graph.getLink?.(id) ?? graph.links?.get?.(id) ?? graph.links?.[id] ?? null;
}

/** The `loaderType` node feeding `node`'s `inputName` input, following reroutes; null when unconnected. */
function findLoader(node, inputName = "text_encoder", loaderType = LOADER_NODE) {
  const graph = node.graph ?? app.graph;
  let current = node;
  for (let hops = 0; hops < 32 && current; hops++) {
    const input = current.inputs?.find((i) => i.name === inputName) ?? (hops > 0 ? current.inputs?.[0] : null);
    const link = getLink(graph, input?.link);
    if (!link) return null;
    const origin = graph.getNodeById(link.origin_id);
    if (!origin) return null;
    if (origin.comfyClass === loaderType || origin.type === loaderType) return origin;
    current = origin; // Reroute or a pass-through node: keep walking
    inputName = null;
  }
  return null;
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

/** {text, state} shown for a tokenize answer (or {pending}, {unconnected}, {error}). */
function describe(result) {
  if (result.pending) {
    return { text: seenEncoders.has(result.model_name) ? "tokens: counting…"
                                                       : `tokens: loading the tokenizer of ${result.model_name}…`,
             state: "pending" };
  }
  if (result.unconnected) return { text: "tokens: connect a Load ELLA Text Encoder node", state: "unconnected" };
  if (result.error) return { text: `tokens: ${result.error}`, state: "error" };
  if (result.max_length == null) return { text: `${result.total} tokens`, state: "ok" };
  const over = result.dropped > 0;
  // Both modes truncate at max_length; flexible mode only does not pad shorter prompts.
  let text = `${result.total} / ${result.max_length} tokens` + (result.mode === "flexible" ? " (flexible)" : "");
  if (over) {
    const tail = result.dropped_text.length > 160 ? result.dropped_text.slice(0, 160) + "…" : result.dropped_text;
    text += ` — over the limit: ${result.dropped} tokens truncated: "${tail}"`;
  }
  return { text, state: over ? "over" : "ok" };
}

/** Height in CSS pixels that `el`'s text needs at its current width: measured on a hidden copy laid out beside it
 * (same styles and fonts), and never less than what the element itself overflows to. */
function neededHeight(el) {
  const width = el.clientWidth || el.offsetWidth;
  if (!width) return MIN_HEIGHT;
  const probe = el.cloneNode(true);
  Object.assign(probe.style, { position: "absolute", visibility: "hidden", pointerEvents: "none", left: "0",
                               top: "0", width: `${width}px`, height: "auto", minHeight: "0", maxHeight: "none",
                               transform: "none" });
  (el.parentElement ?? document.body).appendChild(probe);
  const measured = probe.scrollHeight;
  probe.remove();
  const overflow = el.scrollHeight > el.clientHeight + 1 ? el.scrollHeight : 0;
  return Math.max(MIN_HEIGHT, measured + 2, overflow + 2);
}

function attach(node) {
  const textWidget = node.widgets?.find((w) => w.name === "text");
  if (!textWidget) return;
  const el = document.createElement("div");
  el.className = "ella-token-count";
  el.style.cssText = "font: 11px monospace; padding: 2px 6px; white-space: normal; overflow-wrap: anywhere; " +
    "box-sizing: border-box; overflow: hidden; color: var(--descrip-text, #999);";
  el.textContent = "tokens: …";
  el.dataset.state = "pending";
  let height = MIN_HEIGHT; // what the current text needs; the node is grown to fit it
  // The frontend gives a DOM widget's element its layout height minus `margin` above and below.
  const slot = () => height + 2 * MARGIN;
  const widget = node.addDOMWidget("ella_token_count", "ella_token_count", el, {
    serialize: false, // display only: never saved into widgets_values nor sent to /prompt
    hideOnZoom: false,
    margin: MARGIN,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: slot,
    getMaxHeight: slot,
  });
  widget.serialize = false;

  /** Wrap the text and grow the node until all of it shows (never shrinks the user's size below the text). */
  const fit = () => {
    const need = neededHeight(el);
    if (need === height) return;
    height = need;
    const size = node.computeSize?.();
    if (size && size[1] > node.size[1]) node.setSize([node.size[0], size[1]]);
    node.setDirtyCanvas?.(true, true);
  };

  let lastKey = null;
  let timer = null;
  let seq = 0;

  const show = (result) => {
    const d = describe(result);
    el.textContent = d.text;
    el.style.color = COLORS[d.state];
    el.dataset.state = d.state;
    el.dataset.over = d.state === "over" ? "1" : "0";
    if (!result.pending) node.ellaTokenInfo = result; // for tests and other extensions
    fit();
    requestAnimationFrame(fit); // again once the frontend has laid the widget out at the node's width
  };

  const request = async (payload, mySeq) => {
    let result;
    try {
      const resp = await api.fetchApi("/ella/tokenize", { method: "POST", body: JSON.stringify(payload) });
      const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
      result = resp.ok ? body : { error: body.error ?? `HTTP ${resp.status}` };
      if (resp.ok) seenEncoders.add(payload.model_name);
    } catch (e) {
      result = { error: String(e) };
    }
    if (mySeq === seq) show({ ...payload, ...result });
  };

  const refresh = () => {
    const loader = findLoader(node);
    if (!loader) {
      if (lastKey !== "unconnected") {
        lastKey = "unconnected";
        seq++;
        clearTimeout(timer);
        show({ unconnected: true });
      }
      return;
    }
    const payload = {
      text: String(textWidget.value ?? ""),
      model_name: widgetValue(loader, "model_name"),
      token_mode: widgetValue(loader, "token_mode") ?? "fixed",
      max_length: widgetValue(loader, "max_length") ?? 128,
    };
    // The connector's recorded token mode/length win over the loader's widgets (as in ELLA Prompt Encode).
    const ellaName = widgetValue(findLoader(node, "ella", CONNECTOR_NODE), "ella_name");
    if (typeof ellaName === "string" && ellaName) payload.ella_name = ellaName;
    const key = JSON.stringify(payload);
    if (key === lastKey) return;
    lastKey = key;
    const mySeq = ++seq;
    clearTimeout(timer);
    show({ ...payload, pending: true });
    timer = setTimeout(() => request(payload, mySeq), DEBOUNCE_MS);
  };

  // Typing fires `input` on the textarea; everything else is caught by the poll.
  textWidget.element?.addEventListener?.("input", refresh);
  const poll = setInterval(refresh, POLL_MS);
  const onResize = node.onResize; // a narrower node wraps the text onto more lines
  node.onResize = function () {
    requestAnimationFrame(fit);
    return onResize?.apply(this, arguments);
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    clearInterval(poll);
    clearTimeout(timer);
    return onRemoved?.apply(this, arguments);
  };
  // nodeCreated runs while a workflow is being configured, before its links exist: look once it is done.
  setTimeout(refresh, 0);
}

app.registerExtension({
  name: "ELLA.TokenCount",
  nodeCreated(node) {
    if (node.comfyClass === ENCODE_NODE) attach(node);
  },
});
