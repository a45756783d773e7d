// mllm web chat: a single page that talks to this server's OpenAI-compatible API.
// No build step, no external resources. Assistant text is rendered as plain text; the only markup
// recognised is markdown images whose source is an inline data:image URL, shown as <img>.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"),
    hint: $("empty-hint"),
    input: $("input"),
    send: $("send"),
    attach: $("attach"),
    attachments: $("attachments"),
    draw: $("draw-toggle"),
    stream: $("stream-toggle"),
    reset: $("reset"),
    model: $("model-name"),
    apiKey: $("api-key"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    drawN: $("draw-n"),
  };

  const KEY_STORAGE = "mllm.apiKey";
  const IMAGE_MD = /!\[([^\]\n]*)\]\((data:image\/(?:png|jpeg|jpg|gif|webp|bmp);base64,[A-Za-z0-9+/=\s]*)\)/g;
  const PARTIAL_IMAGE_MD = /!\[[^\]\n]*(?:\]\((?:d(?:a(?:t(?:a(?::[^)]*)?)?)?)?)?)?$/;

  let conversation = []; // OpenAI messages, assistant images kept as markdown in the content
  let pending = []; // data URLs attached to the next message
  let modelId = null;
  let busy = false;
  let controller = null; // AbortController of the request in flight
  let generation = 0; // bumped by reset so a late reply of an old conversation is dropped

  // ------------------------------------------------------------------ settings and API access
  try {
    els.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch (e) {
    /* storage may be disabled */
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function numberOr(el, fallback) {
    const v = parseFloat(el.value);
    return Number.isFinite(v) ? v : fallback;
  }

  // The API's error shape {"error": {"message", ...}}; FastAPI's {"detail": ...} as a fallback.
  async function errorMessage(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error) {
        const err = body.error;
        if (typeof err === "string") return err;
        const msg = err.message || JSON.stringify(err);
        return err.code ? msg + " (" + err.code + ")" : msg;
      }
      if (body && body.detail !== undefined) {
        return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      }
    } catch (e) {
      /* not JSON */
    }
    return (response.status + " " + (response.statusText || "")).trim() + (text ? ": " + text.slice(0, 300) : "");
  }

  async function loadModels() {
    els.model.dataset.state = "loading";
    els.model.textContent = "…";
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) throw new Error(await errorMessage(response));
      const body = await response.json();
      const ids = (body.data || []).map((m) => m.id).filter(Boolean);
      if (!ids.length) throw new Error("the server lists no model");
      modelId = ids[0];
      els.model.textContent = ids.join(", ");
      els.model.title = "model: " + ids.join(", ");
      els.model.dataset.state = "ok";
    } catch (e) {
      els.model.textContent = "model unavailable";
      els.model.title = String(e.message || e);
      els.model.dataset.state = "error";
    }
  }

  // ------------------------------------------------------------------ rendering
  function scrollDown() {
    els.messages.scrollTop = els.messages.scrollHeight;
  }

  function bubble(kind) {
    if (els.hint) els.hint.remove();
    const el = document.createElement("div");
    el.className = "message " + kind;
    els.messages.appendChild(el);
    return el;
  }

  // A small inline note ("…" while typing, "drawing…" while an image is made).
  function note(className, text) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  }

  // An assistant bubble that shows `placeholder` until the reply arrives.
  function pendingBubble(placeholder) {
    const out = bubble("assistant pending");
    out.appendChild(placeholder);
    scrollDown();
    return out;
  }

  function image(src, alt) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = alt || "image";
    img.loading = "lazy";
    return img;
  }

  // Text as text nodes; `![alt](data:image/...)` as <img>; nothing else becomes markup.
  function renderContent(el, text, streaming) {
    el.replaceChildren();
    let last = 0;
    IMAGE_MD.lastIndex = 0;
    let match;
    while ((match = IMAGE_MD.exec(text)) !== null) {
      appendText(el, text.slice(last, match.index));
      el.appendChild(image(match[2].replace(/\s+/g, ""), match[1]));
      last = match.index + match[0].length;
    }
    let rest = text.slice(last);
    if (streaming) {
      const partial = rest.search(PARTIAL_IMAGE_MD);
      if (partial >= 0) {
        appendText(el, rest.slice(0, partial));
        el.appendChild(note("drawing", "drawing…"));
        rest = "";
      }
    }
    appendText(el, rest);
  }

  function appendText(el, text) {
    if (!text) return;
    const span = document.createElement("span");
    span.className = "text";
    span.textContent = text;
    el.appendChild(span);
  }

  function renderUser(text, images) {
    const el = bubble("user");
    if (images.length) {
      const row = document.createElement("div");
      row.className = "images";
      images.forEach((src) => row.appendChild(image(src, "attached image")));
      el.appendChild(row);
    }
    appendText(el, text);
    scrollDown();
    return el;
  }

  function renderError(message) {
    const el = bubble("error");
    el.setAttribute("role", "alert");
    el.textContent = message;
    scrollDown();
    return el;
  }

  function renderAttachments() {
    updatePlaceholder();
    els.attachments.replaceChildren();
    pending.forEach((src, i) => {
      const item = document.createElement("div");
      item.className = "thumb";
      item.appendChild(image(src, "attachment " + (i + 1)));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.title = "remove";
      remove.textContent = "×";
      remove.addEventListener("click", () => {
        pending.splice(i, 1);
        renderAttachments();
      });
      item.appendChild(remove);
      els.attachments.appendChild(item);
    });
  }

  function setBusy(value) {
    busy = value;
    els.messages.dataset.busy = value ? "true" : "false";
    els.send.disabled = value;
    els.send.textContent = value ? "…" : "Send";
  }

  // ------------------------------------------------------------------ attachments
  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) {
        renderError(file.name + " is not an image");
        continue;
      }
      try {
        pending.push(await readAsDataURL(file));
      } catch (e) {
        renderError("could not read " + file.name + ": " + e);
      }
    }
    renderAttachments();
  }

  els.attach.addEventListener("change", async () => {
    const files = Array.from(els.attach.files || []);
    els.attach.value = ""; // the same file can be picked again
    await addFiles(files);
  });

  els.input.addEventListener("paste", (event) => {
    const files = Array.from((event.clipboardData && event.clipboardData.files) || []);
    if (files.some((f) => f.type.startsWith("image/"))) {
      event.preventDefault();
      addFiles(files);
    }
  });

  // ------------------------------------------------------------------ chat
  function userMessage(text, images) {
    if (!images.length) return { role: "user", content: text };
    const content = images.map((url) => ({ type: "image_url", image_url: { url: url } }));
    if (text) content.push({ type: "text", text: text });
    return { role: "user", content: content };
  }

  function withImages(content, images) {
    // `images` ([{b64_json}] or [{url}]) shown as markdown unless the content already has them
    let text = content || "";
    for (const img of images || []) {
      const src = img.b64_json ? "data:image/png;base64," + img.b64_json : img.url || "";
      if (src && !text.includes(src)) text += (text ? "\n" : "") + "![image](" + src + ")";
    }
    return text;
  }

  async function readStream(response, onText) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data.trim() === "[DONE]") return text;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (e) {
          continue;
        }
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        if (!delta.content && !(delta.images && delta.images.length)) continue;
        if (delta.content) text += delta.content;
        if (delta.images) text = withImages(text, delta.images);
        onText(text);
      }
      if (done) return text;
    }
  }

  async function chat(text, images, turn) {
    const message = userMessage(text, images);
    renderUser(text, images);
    conversation.push(message);
    const out = pendingBubble(note("typing", "…"));
    const stream = els.stream.checked;
    const body = {
      model: modelId || "default",
      messages: conversation,
      stream: stream,
      max_tokens: Math.round(numberOr(els.maxTokens, 256)),
      temperature: numberOr(els.temperature, 0.7),
    };
    let reply;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      if (stream) {
        let frame = 0;
        reply = await readStream(response, (partial) => {
          if (turn !== generation) return;
          cancelAnimationFrame(frame);
          frame = requestAnimationFrame(() => {
            renderContent(out, partial, true);
            scrollDown();
          });
        });
        cancelAnimationFrame(frame);
      } else {
        const result = await response.json();
        const msg = (result.choices && result.choices[0] && result.choices[0].message) || {};
        reply = withImages(msg.content, msg.images);
      }
    } catch (e) {
      if (turn !== generation) return;
      out.remove();
      conversation.pop(); // keep the conversation valid for the next try
      if (e.name !== "AbortError") renderError(String(e.message || e));
      return;
    }
    if (turn !== generation) return;
    out.classList.remove("pending");
    renderContent(out, reply, false);
    if (!reply) out.classList.add("empty");
    conversation.push({ role: "assistant", content: reply });
    scrollDown();
  }

  // ------------------------------------------------------------------ draw
  async function draw(text, turn) {
    renderUser(text, []);
    const out = pendingBubble(note("drawing", "drawing…"));
    let reply;
    try {
      const response = await fetch("/v1/images/generations", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify({
          model: modelId || undefined,
          prompt: text,
          n: Math.max(1, Math.round(numberOr(els.drawN, 1))),
          response_format: "b64_json",
        }),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const result = await response.json();
      reply = withImages("", result.data).replace(/!\[image\]/g, "![" + text.replace(/[\]\n]/g, " ") + "]");
      if (!reply) throw new Error("the server returned no image");
    } catch (e) {
      if (turn !== generation) return;
      out.remove();
      if (e.name !== "AbortError") renderError(String(e.message || e));
      return;
    }
    if (turn !== generation) return;
    out.classList.remove("pending");
    renderContent(out, reply, false);
    // kept in the conversation like a chat turn, so later questions can refer to the drawing
    conversation.push({ role: "user", content: text });
    conversation.push({ role: "assistant", content: reply });
    scrollDown();
  }

  // ------------------------------------------------------------------ edit
  // draw mode with one image attached: the text is an instruction for /v1/images/edits ("make the circle blue")
  async function edit(text, source, turn) {
    renderUser(text, [source]);
    const out = pendingBubble(note("drawing", "editing…"));
    let reply;
    try {
      const response = await fetch("/v1/images/edits", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify({
          model: modelId || undefined,
          image: source,
          prompt: text,
          n: Math.max(1, Math.round(numberOr(els.drawN, 1))),
          response_format: "b64_json",
        }),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const result = await response.json();
      reply = withImages("", result.data).replace(/!\[image\]/g, "![" + text.replace(/[\]\n]/g, " ") + "]");
      if (!reply) throw new Error("the server returned no image");
    } catch (e) {
      if (turn !== generation) return;
      out.remove();
      if (e.name !== "AbortError") renderError(String(e.message || e));
      return;
    }
    if (turn !== generation) return;
    out.classList.remove("pending");
    renderContent(out, reply, false);
    // kept in the conversation as the chat turn it stands for: the image and the instruction, the edit
    conversation.push(userMessage(text, [source]));
    conversation.push({ role: "assistant", content: reply });
    scrollDown();
  }

  // ------------------------------------------------------------------ wiring
  async function send() {
    if (busy) return;
    const text = els.input.value.trim();
    const drawing = els.draw.checked;
    if (drawing && !text) return;
    if (!text && !pending.length) return;
    if (drawing && pending.length > 1) {
      renderError("draw mode edits one attached image; remove the others (or switch draw off to ask about them)");
      return;
    }
    setBusy(true);
    const turn = generation;
    controller = new AbortController();
    els.input.value = "";
    try {
      const images = pending;
      pending = [];
      renderAttachments();
      if (drawing && images.length === 1) {
        await edit(text, images[0], turn);
      } else if (drawing) {
        await draw(text, turn);
      } else {
        await chat(text, images, turn);
      }
    } finally {
      if (turn === generation) setBusy(false);
      els.input.focus();
    }
  }

  els.send.addEventListener("click", send);
  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });

  els.reset.addEventListener("click", () => {
    generation += 1;
    if (controller) controller.abort();
    conversation = [];
    pending = [];
    renderAttachments();
    els.messages.replaceChildren();
    setBusy(false);
    els.input.focus();
  });

  els.apiKey.addEventListener("change", () => {
    try {
      const key = els.apiKey.value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
    } catch (e) {
      /* storage may be disabled */
    }
    loadModels();
  });

  function updatePlaceholder() {
    els.input.placeholder = !els.draw.checked
      ? "Message (Enter to send, Shift+Enter for a new line)"
      : pending.length
        ? "How to change the image, e.g. make the circle blue (Enter to edit)"
        : "Describe a picture to draw (Enter to draw)";
  }

  els.draw.addEventListener("change", () => {
    document.body.classList.toggle("drawing-mode", els.draw.checked);
    updatePlaceholder();
  });

  loadModels();
})();
