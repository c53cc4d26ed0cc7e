// Live token count under the text of every "ELLA Prompt Encode" node.
//
// The count needs the tokenizer of the text encoder actually connected to the node, so the extension follows the
// `text_encoder` link to the "Load ELLA Text Encoder" node, reads its model_name / token_mode / max_length widgets,
// and asks the server (POST /ella/tokenize, nodes/routes.py). Requests are debounced; the server caches tokenizers.
// In fixed mode a prompt longer than max_length is truncated: the widget turns red and shows the dropped words.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const ENCODE_NODE = "EllaTSCEncode";
const LOADER_NODE = "EllaTSCTextEncoderLoader";
const DEBOUNCE_MS = 350;
const POLL_MS = 700; // catches changes that fire no event (loader widgets, rewiring, loading a workflow)

function getLink(graph, id) {
  if (id == null) return null;
  return graph.getLink?.(id) ?? graph.links?.get?.(id) ?? graph.links?.[id] ?? null;
}

/** The loader node feeding `node`'s text_encoder input, following reroutes; null when unconnected. */
function findLoader(node) {
  const graph = node.graph ?? app.graph;
  let current = node;
  let inputName = "text_encoder";
  for (let hops = 0; hops < 32 && current; hops++) {
    const input = current.inputs?.find((i) => i.name === inputName) ?? (hops > 0 ? current.inputs?.[0] : null);
    const link = getLink(graph, input?.link);
    if (!link) return null;
    const origin = graph.getNodeById(link.origin_id);
    if (!origin) return null;
    if (origin.comfyClass === LOADER_NODE || origin.type === LOADER_NODE) return origin;
    current = origin; // Reroute or a pass-through node: keep walking
    inputName = null;
  }
  return null;
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function describe(result) {
  if (result.error) return { text: `tokens: ${result.error}`, over: false, error: true };
  if (result.max_length == null) return { text: `${result.total} tokens`, over: false };
  const over = result.dropped > 0;
  // Both modes truncate at max_length; flexible mode only does not pad shorter prompts.
  let text = `${result.total} / ${result.max_length} tokens` + (result.mode === "flexible" ? " (flexible)" : "");
  if (over) {
    const tail = result.dropped_text.length > 160 ? result.dropped_text.slice(0, 160) + "…" : result.dropped_text;
    text += ` — over the limit: ${result.dropped} tokens truncated: "${tail}"`;
  }
  return { text, over };
}

function attach(node) {
  const textWidget = node.widgets?.find((w) => w.name === "text");
  if (!textWidget) return;
  const el = document.createElement("div");
  el.className = "ella-token-count";
  el.style.cssText =
    "font: 11px monospace; padding: 2px 6px; white-space: normal; overflow: hidden; color: var(--descrip-text, #999);";
  el.textContent = "tokens: …";
  const widget = node.addDOMWidget("ella_token_count", "ella_token_count", el, {
    serialize: false, // display only: never saved into widgets_values nor sent to /prompt
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => 22,
    getMaxHeight: () => 64,
  });
  widget.serialize = false;

  let lastKey = null;
  let timer = null;
  let seq = 0;

  const show = (result) => {
    const d = describe(result);
    el.textContent = d.text;
    el.style.color = d.over ? "#ff6b6b" : d.error ? "#d9a441" : "var(--descrip-text, #999)";
    el.dataset.over = d.over ? "1" : "0";
    node.ellaTokenInfo = result; // for tests and other extensions
    node.setDirtyCanvas?.(true, true);
  };

  const request = async (payload, mySeq) => {
    let result;
    try {
      const resp = await api.fetchApi("/ella/tokenize", { method: "POST", body: JSON.stringify(payload) });
      const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
      result = resp.ok ? body : { error: body.error ?? `HTTP ${resp.status}` };
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
        show({ error: "connect a Load ELLA Text Encoder node" });
      }
      return;
    }
    const payload = {
      text: String(textWidget.value ?? ""),
      model_name: widgetValue(loader, "model_name"),
      token_mode: widgetValue(loader, "token_mode") ?? "fixed",
      max_length: widgetValue(loader, "max_length") ?? 128,
    };
    const key = JSON.stringify(payload);
    if (key === lastKey) return;
    lastKey = key;
    const mySeq = ++seq;
    clearTimeout(timer);
    timer = setTimeout(() => request(payload, mySeq), DEBOUNCE_MS);
  };

  // Typing fires `input` on the textarea; everything else is caught by the poll.
  textWidget.element?.addEventListener?.("input", refresh);
  const poll = setInterval(refresh, POLL_MS);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    clearInterval(poll);
    clearTimeout(timer);
    return onRemoved?.apply(this, arguments);
  };
  refresh();
}

app.registerExtension({
  name: "ELLA.TokenCount",
  nodeCreated(node) {
    if (node.comfyClass === ENCODE_NODE) attach(node);
  },
});
