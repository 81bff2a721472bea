// flumeq dashboard: fills the server-rendered shells from the JSON API and
// refreshes them in place. Data only ever reaches the page as text
// (textContent / createTextNode), never as HTML.
"use strict";

(() => {
  const body = document.body;
  const root = body.dataset.root || "";
  const page = body.dataset.page;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const POLL_MS = 1500;

  // -- building nodes ------------------------------------------------------

  // el("a", {href: "/x", class: "y"}, "text", otherNode): strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const byId = (id) => document.getElementById(id);

  function setText(id, value) {
    const node = byId(id);
    if (node) node.textContent = value;
  }

  function queueHref(name) {
    return root + "/queues/" + encodeURIComponent(name);
  }

  function deadHref(name) {
    return root + "/dead/" + encodeURIComponent(name);
  }

  function taskHref(id) {
    return root + "/tasks?id=" + encodeURIComponent(id);
  }

  function historyHref(id) {
    return root + "/history?task=" + encodeURIComponent(id);
  }

  // -- formatting ------------------------------------------------------------

  const numberFormat = new Intl.NumberFormat("en-US");

  function fmtInt(value) {
    if (value === null || value === undefined || value === "") return "–";
    const n = Number(value);
    return Number.isFinite(n) ? numberFormat.format(n) : String(value);
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "–";
    let s = Math.max(0, Number(seconds));
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    s = Math.floor(s);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " m";
    return m + " m " + (s % 60) + " s";
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function fmtTime(epoch) {
    if (!epoch) return "–";
    const t = new Date(Number(epoch) * 1000);
    return (
      t.getFullYear() + "-" + pad(t.getMonth() + 1) + "-" + pad(t.getDate()) + " " +
      pad(t.getHours()) + ":" + pad(t.getMinutes()) + ":" + pad(t.getSeconds())
    );
  }

  function fmtRelative(epoch, now) {
    if (!epoch) return "–";
    const delta = Number(epoch) - now;
    return delta >= 0 ? "in " + fmtDuration(delta) : fmtDuration(-delta) + " ago";
  }

  function fmtRate(rate) {
    if (rate === null || rate === undefined) return "–";
    if (rate < 0.05) return "0";
    if (rate < 10) return rate.toFixed(1);
    return numberFormat.format(Math.round(rate));
  }

  // Pretty JSON when the text is JSON, else the text as it is.
  function prettyJson(text) {
    if (typeof text !== "string") return JSON.stringify(text, null, 2);
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      return text;
    }
  }

  // Throughput from deltas of the processed counter between two polls (server clock).
  const rates = new Map();

  function rateOf(key, processed, time) {
    const previous = rates.get(key);
    let rate = previous ? previous.rate : null;
    if (previous && time > previous.time) {
      const delta = Number(processed) - previous.processed;
      const instant = delta >= 0 ? delta / (time - previous.time) : 0;
      rate = rate === null ? instant : 0.5 * instant + 0.5 * rate;
    }
    rates.set(key, { processed: Number(processed), time, rate });
    return rate;
  }

  // -- talking to the server -------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function readJson(response) {
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const message = (data && data.error) || response.status + " " + response.statusText;
      throw new HttpError(response.status, message);
    }
    return data;
  }

  async function getJson(path) {
    const response = await fetch(root + path, {
      headers: { Accept: "application/json" },
      cache: "no-store",
      credentials: "same-origin",
    });
    return readJson(response);
  }

  async function postJson(path, payload) {
    const response = await fetch(root + path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(payload || {}),
      credentials: "same-origin",
    });
    if (response.status === 401) {
      // The browser asks for the token on /login, then comes back here.
      const path = location.pathname.startsWith(root) ? location.pathname.slice(root.length) : "/";
      location.assign(root + "/login?next=" + encodeURIComponent((path || "/") + location.search));
      throw new HttpError(401, "this action needs the dashboard token");
    }
    return readJson(response);
  }

  function setStatus(ok, text) {
    const status = byId("status");
    if (!status) return;
    status.classList.toggle("ok", ok);
    status.classList.toggle("down", !ok);
    status.querySelector(".status-text").textContent = text;
  }

  let toastTimer = null;

  function toast(text, bad) {
    const node = byId("toast");
    if (!node) return;
    node.textContent = text;
    node.classList.toggle("bad", Boolean(bad));
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      node.hidden = true;
    }, 4000);
  }

  // Polls `path` every `every` ms while the tab is visible; returns "refresh now".
  function poll(path, render, every) {
    let timer = null;
    let running = false;
    async function tick() {
      clearTimeout(timer);
      if (running) return;
      running = true;
      try {
        if (!document.hidden) {
          const data = await getJson(path);
          render(data);
          setStatus(true, "live · " + fmtTime(Date.now() / 1000).slice(11));
        }
      } catch (error) {
        const labels = { 401: "needs the token", 404: "not found", 503: "redis unreachable" };
        setStatus(false, labels[error.status] || "offline");
        if (error.status === 404) render(null, error);
        else console.warn("flumeq dashboard:", error.message);
      } finally {
        running = false;
        timer = setTimeout(tick, every || POLL_MS);
      }
    }
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) tick();
    });
    tick();
    return tick;
  }

  // -- tables ------------------------------------------------------------------

  function fillTable(table, rows, emptyText) {
    if (!table) return;
    const tbody = table.tBodies[0];
    if (rows.length) {
      tbody.replaceChildren(...rows);
      return;
    }
    const columns = table.tHead.rows[0].cells.length;
    tbody.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: columns }, emptyText)));
  }

  function num(value, extraClass) {
    return el("td", { class: "num" + (extraClass ? " " + extraClass : "") }, value);
  }

  function code(text) {
    return el("code", {}, text);
  }

  function stateBadge(state) {
    return el("span", { class: "badge state-" + String(state).replace(/[^a-z_]/g, "") }, state);
  }

  // -- overview ------------------------------------------------------------------

  function workerCell(worker) {
    return el(
      "td",
      {},
      el("div", { class: "strong" }, worker.consumer),
      el("div", { class: "sub" }, (worker.host || "?") + " · pid " + (worker.pid || "?")),
    );
  }

  function renderOverview(data) {
    const now = data.time;
    const totals = { ready: 0, in_flight: 0, delayed: 0, dead: 0, processed: 0 };
    let totalRate = null;
    const rows = data.queues.map((queue) => {
      for (const key of Object.keys(totals)) totals[key] += Number(queue[key] || 0);
      const rate = rateOf("q:" + queue.name, queue.processed || 0, now);
      if (rate !== null) totalRate = (totalRate || 0) + rate;
      const dead = Number(queue.dead || 0);
      return el(
        "tr",
        { "data-queue": queue.name },
        el(
          "td",
          {},
          el("a", { href: queueHref(queue.name) }, queue.name),
          queue.paused ? el("span", { class: "pill", title: "no engine starts its tasks" }, "paused") : "",
        ),
        num(fmtInt(queue.ready), "ready"),
        num(fmtInt(queue.in_flight)),
        num(fmtInt(queue.delayed)),
        el(
          "td",
          { class: "num" + (dead ? " bad" : "") },
          dead ? el("a", { href: deadHref(queue.name) }, fmtInt(dead)) : "0",
        ),
        num(fmtInt(queue.processed)),
        num(fmtInt(queue.failed)),
        num(fmtInt(queue.retried)),
        num(fmtRate(rate), "rate"),
        num(fmtDuration(queue.oldest_ready_age)),
      );
    });
    fillTable(byId("queues"), rows, "No queues yet: enqueue a task to see it here.");
    for (const [key, value] of Object.entries(totals)) setText("total-" + key, fmtInt(value));
    setText("total-rate", totalRate === null ? "–" : fmtRate(totalRate) + " /s");

    const workers = data.workers.map((worker) =>
      el(
        "tr",
        {},
        workerCell(worker),
        el("td", {}, (worker.queues || []).join(", ")),
        num(fmtInt(worker.processes)),
        num(fmtInt(worker.processed)),
        num(fmtInt(worker.failed)),
        num(fmtDuration(now - worker.started)),
        num(fmtDuration(now - worker.heartbeat) + " ago"),
      ),
    );
    fillTable(byId("workers"), workers, "No live workers.");
  }

  // -- queue detail --------------------------------------------------------------

  function renderQueue(data, error) {
    if (!data) {
      setText("count-ready", "gone");
      toast(error ? error.message : "queue not found", true);
      return;
    }
    const now = data.time;
    for (const key of ["ready", "in_flight", "delayed", "dead", "processed"]) {
      setText("count-" + key, fmtInt(data[key]));
    }
    setText("count-failed", fmtInt(data.failed) + " / " + fmtInt(data.retried));
    const rate = rateOf("queue", data.processed || 0, now);
    setText("count-rate", rate === null ? "–" : fmtRate(rate) + " /s");
    setText("count-oldest", fmtDuration(data.oldest_ready_age));
    const toggle = byId("pause-toggle");
    if (toggle) {
      toggle.disabled = false;
      toggle.dataset.paused = data.paused ? "1" : "";
      toggle.textContent = data.paused ? "Resume" : "Pause";
    }
    const pill = byId("paused-pill");
    if (pill) pill.hidden = !data.paused;
    const deadLink = byId("dead-link");
    if (deadLink) deadLink.classList.toggle("bad", Number(data.dead) > 0);

    fillTable(
      byId("consumers"),
      (data.consumers || []).map((consumer) =>
        el(
          "tr",
          {},
          el("td", {}, consumer.name),
          num(fmtInt(consumer.pending)),
          num(fmtDuration(consumer.idle)),
        ),
      ),
      "No consumers: no engine has read this queue yet.",
    );
    const pending = data.pending || [];
    setText(
      "pending-note",
      pending.length < Number(data.in_flight)
        ? "(the " + pending.length + " oldest of " + fmtInt(data.in_flight) + " pending entries)"
        : "(pending entries, oldest first)",
    );
    fillTable(
      byId("pending"),
      pending.map((entry) =>
        el(
          "tr",
          {},
          el("td", {}, code(entry.entry_id)),
          el("td", {}, el("a", { href: taskHref(entry.task_id) }, code(entry.task_id))),
          el("td", {}, entry.type),
          el("td", {}, entry.consumer),
          num(fmtDuration(entry.idle), entry.idle > 60 ? "warn" : ""),
          num(fmtInt(entry.deliveries), entry.deliveries > 1 ? "warn" : ""),
        ),
      ),
      "Nothing in flight.",
    );
    fillTable(
      byId("delayed"),
      (data.delayed_tasks || []).map((task) =>
        el(
          "tr",
          {},
          el("td", { title: fmtTime(task.due) }, fmtRelative(task.due, now)),
          el("td", {}, el("a", { href: taskHref(task.task_id) }, code(task.task_id))),
          el("td", {}, task.type),
          num(fmtInt(task.attempt)),
          el("td", { class: "clip", title: task.error || "" }, task.error || ""),
        ),
      ),
      "Nothing delayed.",
    );
    const types = Object.entries(data.types || {}).sort((a, b) => a[0].localeCompare(b[0]));
    fillTable(
      byId("types"),
      types.map(([type, counters]) =>
        el(
          "tr",
          {},
          el("td", {}, type),
          num(fmtInt(counters.enqueued)),
          num(fmtInt(counters.processed)),
          num(fmtInt(counters.failed)),
          num(fmtInt(counters.retried)),
          num(fmtInt(counters.dead), counters.dead ? "bad" : ""),
          num(fmtInt(counters.cancelled)),
        ),
      ),
      "No counters per type yet.",
    );
  }

  // -- dead letters ----------------------------------------------------------------

  function renderLetter(letter, queue, refresh, openDetails) {
    const requeue = el("button", { type: "button", class: "small requeue" }, "Requeue");
    requeue.addEventListener("click", async () => {
      requeue.disabled = true;
      try {
        const result = await postJson(
          "/api/requeue/" + encodeURIComponent(queue),
          { ids: [letter.task_id] },
        );
        toast("Requeued " + result.requeued + " task(s).");
      } catch (error) {
        toast("Requeue failed: " + error.message, true);
        requeue.disabled = false;
      }
      refresh();
    });

    const details = (label, key, text) => {
      const node = el(
        "details",
        { "data-key": letter.entry_id + ":" + key },
        el("summary", {}, label),
        el("pre", {}, text),
      );
      node.open = openDetails.has(letter.entry_id + ":" + key);
      return node;
    };

    const pair = (label, value, title) =>
      el("div", {}, el("dt", {}, label), el("dd", title ? { title } : {}, value));
    const meta = el(
      "dl",
      { class: "meta" },
      pair("Reason", el("span", { class: "badge reason" }, letter.reason || "error")),
      pair("Attempts", fmtInt(letter.attempts)),
      pair("Failed", fmtRelative(letter.failed_at, Date.now() / 1000), fmtTime(letter.failed_at)),
      pair("Enqueued", fmtTime(letter.enqueued_at)),
      pair("Entry", code(letter.entry_id)),
    );

    return el(
      "article",
      { class: "letter", "data-task-id": letter.task_id, "data-entry-id": letter.entry_id },
      el(
        "header",
        {},
        el("a", { class: "task-link", href: taskHref(letter.task_id) }, code(letter.task_id)),
        el("span", { class: "type" }, letter.type || "(no type)"),
        el("a", { class: "history-link", href: historyHref(letter.task_id) }, "history"),
        el("span", { class: "spacer" }),
        requeue,
      ),
      meta,
      el("div", { class: "label" }, "Error"),
      el("pre", { class: "error-text" }, letter.error || "(no error text)"),
      el("div", { class: "label" }, "Payload"),
      el("pre", { class: "payload" }, prettyJson(letter.payload === undefined ? "" : letter.payload)),
      letter.traceback ? details("Traceback", "tb", letter.traceback) : null,
    );
  }

  function setupDead() {
    const queue = body.dataset.queue;
    const container = byId("letters");
    let last = null;
    const refresh = poll(
      "/api/dead/" + encodeURIComponent(queue),
      (data, error) => {
        if (!data) {
          container.replaceChildren(el("p", { class: "empty" }, error ? error.message : "not found"));
          return;
        }
        setText("dead-total", fmtInt(data.total));
        const shown = data.dead.length;
        setText(
          "dead-note",
          shown < data.total
            ? "Newest first: the " + shown + " newest of " + fmtInt(data.total) + " shown."
            : "Newest first.",
        );
        byId("requeue-all").disabled = !data.total;
        byId("purge").disabled = !data.total;
        const key = JSON.stringify(data.dead);
        if (key === last) return; // unchanged: keep open tracebacks and focus as they are
        last = key;
        const openDetails = new Set(
          [...container.querySelectorAll("details[open]")].map((node) => node.dataset.key),
        );
        if (!shown) {
          container.replaceChildren(el("p", { class: "empty" }, "No dead letters. All good."));
          return;
        }
        container.replaceChildren(
          ...data.dead.map((letter) => renderLetter(letter, queue, refresh, openDetails)),
        );
      },
    );

    byId("requeue-all").addEventListener("click", async () => {
      if (!confirm("Requeue every dead letter of " + queue + "? They run again from attempt 0.")) return;
      try {
        const result = await postJson(
          "/api/requeue/" + encodeURIComponent(queue),
          { all: true },
        );
        toast("Requeued " + result.requeued + " task(s).");
      } catch (error) {
        toast("Requeue failed: " + error.message, true);
      }
      refresh();
    });
    byId("purge").addEventListener("click", async () => {
      if (!confirm("Delete every dead letter of " + queue + " for good? This cannot be undone.")) return;
      try {
        const result = await postJson("/api/purge/" + encodeURIComponent(queue), {});
        toast("Purged " + result.purged + " dead letter(s).");
      } catch (error) {
        toast("Purge failed: " + error.message, true);
      }
      refresh();
    });
  }

  function setupQueue() {
    const queue = body.dataset.queue;
    const refresh = poll("/api/queues/" + encodeURIComponent(queue), renderQueue);
    const toggle = byId("pause-toggle");
    toggle.addEventListener("click", async () => {
      const resume = toggle.dataset.paused === "1";
      toggle.disabled = true;
      try {
        await postJson("/api/" + (resume ? "resume/" : "pause/") + encodeURIComponent(queue), {});
        toast(resume ? "Resumed " + queue + "." : "Paused " + queue + ": no engine starts its tasks.");
      } catch (error) {
        toast((resume ? "Resume" : "Pause") + " failed: " + error.message, true);
      }
      refresh();
    });
  }

  // -- task lookup -------------------------------------------------------------------

  const TASK_FIELDS = [
    ["task_id", "Task id"],
    ["type", "Type"],
    ["entry_id", "Entry"],
    ["attempt", "Attempt"],
    ["max_retry", "Max retries"],
    ["attempts", "Attempts"],
    ["timeout", "Timeout (s)"],
    ["enqueued_at", "Enqueued", fmtTime],
    ["due", "Due", fmtTime],
    ["deadline", "Deadline", fmtTime],
    ["failed_at", "Failed", fmtTime],
    ["started_at", "Started", fmtTime],
    ["finished_at", "Finished", fmtTime],
    ["worker", "Worker"],
    ["result", "Result"],
    ["reason", "Reason"],
    ["labels", "Labels"],
    ["unique_key", "Unique key"],
    ["error", "Error"],
  ];

  // A task in one of these states can still be cancelled.
  const CANCELLABLE = new Set(["ready", "in_flight", "delayed"]);

  function renderHit(hit, onChange) {
    const rows = [];
    const known = new Set(["queue", "state", "payload", "traceback"]);
    for (const [key, label, format] of TASK_FIELDS) {
      known.add(key);
      if (hit[key] === undefined || hit[key] === null || hit[key] === "") continue;
      rows.push(el("tr", {}, el("th", {}, label), el("td", {}, format ? format(hit[key]) : String(hit[key]))));
    }
    for (const [key, value] of Object.entries(hit)) {
      if (known.has(key) || value === null || value === "") continue;
      rows.push(el("tr", {}, el("th", {}, key), el("td", {}, typeof value === "object" ? JSON.stringify(value) : String(value))));
    }
    const links = [el("a", { href: queueHref(hit.queue) }, hit.queue)];
    if (hit.task_id) links.push(" · ", el("a", { class: "history-link", href: historyHref(hit.task_id) }, "history"));
    if (hit.state === "dead") links.push(" · ", el("a", { href: deadHref(hit.queue) }, "dead letters"));
    let cancel = null;
    if (CANCELLABLE.has(hit.state) && hit.task_id) {
      cancel = el("button", { class: "cancel-task", type: "button" }, "Cancel");
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          const reply = await postJson("/api/cancel/" + encodeURIComponent(hit.queue), { id: hit.task_id });
          toast(reply.cancelled ? "Cancelled " + hit.task_id + "." : "Task " + hit.task_id + " had ended already.");
        } catch (error) {
          toast("Cancel failed: " + error.message, true);
          cancel.disabled = false;
        }
        if (onChange) onChange();
      });
    }
    return el(
      "article",
      { class: "hit" },
      el("header", {}, stateBadge(hit.state), el("span", {}, "in queue "), ...links, cancel ? " " : null, cancel),
      el("table", { class: "fields" }, el("tbody", {}, ...rows)),
      hit.payload !== undefined ? el("div", { class: "label" }, "Payload") : null,
      hit.payload !== undefined ? el("pre", { class: "payload" }, prettyJson(hit.payload)) : null,
      hit.traceback ? el("div", { class: "label" }, "Traceback") : null,
      hit.traceback ? el("pre", {}, hit.traceback) : null,
    );
  }

  function setupTask() {
    const results = byId("results");
    const taskId = results.dataset.taskId;
    if (!taskId) {
      setStatus(true, "idle");
      return;
    }
    let last = null;
    let refresh = null;
    refresh = poll(
      "/api/tasks?id=" + encodeURIComponent(taskId),
      (data) => {
        const key = JSON.stringify(data && data.found);
        if (key === last) return;
        last = key;
        if (!data.found.length) {
          results.replaceChildren(
            el("p", { class: "empty" }, "No task ", code(taskId), " is ready, in flight, delayed or dead (done tasks leave no trace unless enqueued with a retention or a task_id)."),
          );
          return;
        }
        results.replaceChildren(...data.found.map((hit) => renderHit(hit, () => refresh())));
      },
      // A lookup scans streams: refresh it rarely.
      15000,
    );
  }

  // -- history ---------------------------------------------------------------------

  function fmtMs(ms) {
    return ms === null || ms === undefined ? "–" : fmtDuration(Number(ms) / 1000);
  }

  function renderHistoryTask(task) {
    const pair = (label, value) => el("tr", {}, el("th", {}, label), el("td", {}, value));
    const rows = [
      pair("Task id", code(task.task_id)),
      pair("Queue", el("a", { href: queueHref(task.queue) }, task.queue)),
      pair("Type", task.type || "–"),
      pair("Runs", fmtInt(task.attempts)),
      pair("Worker", task.worker || "–"),
      pair("Enqueued", fmtTime(task.enqueued_at)),
      pair("Started", fmtTime(task.started_at)),
      pair("Finished", fmtTime(task.finished_at)),
      pair("Run time", fmtMs(task.duration_ms)),
    ];
    if (task.reason) rows.push(pair("Reason", el("span", { class: "badge reason" }, task.reason)));
    if (task.labels) rows.push(pair("Labels", JSON.stringify(task.labels)));
    if (task.cut && task.cut.length) rows.push(pair("Cut", "longer than the history keeps: " + task.cut.join(", ")));
    const timeline = el(
      "table",
      { class: "timeline" },
      el("thead", {}, el("tr", {}, el("th", {}, "At"), el("th", {}, "Event"), el("th", { class: "num" }, "Attempt"), el("th", {}, "Worker"), el("th", { class: "num" }, "Run time"), el("th", {}, "Detail"))),
      el(
        "tbody",
        {},
        ...task.timeline.map((event) =>
          el(
            "tr",
            { class: "event-" + event.event },
            el("td", {}, fmtTime(event.at)),
            el("td", {}, stateBadge(event.event)),
            num(fmtInt(event.attempt)),
            el("td", {}, event.worker || ""),
            num(fmtMs(event.duration_ms)),
            el(
              "td",
              {},
              [event.reason, event.error ? event.error.split("\n")[0] : null, event.due_at ? "due " + fmtTime(event.due_at) : null]
                .filter(Boolean)
                .join(" · "),
            ),
          ),
        ),
      ),
    );
    const block = (label, text, cls) =>
      text === null || text === undefined ? [] : [el("div", { class: "label" }, label), el("pre", { class: cls || "" }, text)];
    return el(
      "article",
      { class: "hit history-task" },
      el("header", {}, stateBadge(task.state), el("span", {}, "task "), code(task.task_id), " · ", el("a", { href: taskHref(task.task_id) }, "look up in Redis")),
      el("table", { class: "fields" }, el("tbody", {}, ...rows)),
      el("div", { class: "label" }, "Timeline"),
      el("div", { class: "table-wrap" }, timeline),
      ...block("Payload", task.payload === null ? null : prettyJson(task.payload), "payload"),
      ...block("Result", task.result === null ? null : prettyJson(task.result), "result"),
      ...block("Error", task.error, "error-text"),
      ...block("Traceback", task.traceback),
    );
  }

  async function showHistoryTask(id, queue) {
    const holder = byId("history-task");
    holder.dataset.taskId = id;
    try {
      const data = await getJson("/api/history/task?id=" + encodeURIComponent(id) + (queue ? "&queue=" + encodeURIComponent(queue) : ""));
      holder.replaceChildren(
        data.task ? renderHistoryTask(data.task) : el("p", { class: "empty" }, "Task ", code(id), " is not in the history."),
      );
      setStatus(true, "history");
    } catch (error) {
      holder.replaceChildren(el("p", { class: "empty" }, error.message));
      setStatus(false, error.status === 503 ? "history unreachable" : "error");
    }
  }

  function setupHistory() {
    const table = byId("history-table");
    if (!table) {
      setStatus(true, "idle");
      return;
    }
    const more = byId("history-more");
    const filters = new URLSearchParams(window.location.search);
    filters.delete("task");
    let shown = [];
    const row = (task) => {
      const link = el("a", { href: historyHref(task.task_id), class: "task-link" }, code(task.task_id));
      link.addEventListener("click", (event) => {
        event.preventDefault();
        showHistoryTask(task.task_id, task.queue);
      });
      return el(
        "tr",
        {},
        el("td", {}, link),
        el("td", {}, el("a", { href: queueHref(task.queue) }, task.queue)),
        el("td", {}, task.type || ""),
        el("td", {}, stateBadge(task.state)),
        num(fmtInt(task.attempts)),
        el("td", {}, fmtTime(task.updated_at)),
        num(fmtMs(task.duration_ms)),
      );
    };
    async function load(older) {
      const params = new URLSearchParams(filters);
      if (older && shown.length) {
        const last = shown[shown.length - 1];
        params.set("before_at", String(last.updated_at));
        params.set("before_id", last.task_id);
      }
      try {
        const data = await getJson("/api/history?" + params.toString());
        shown = older ? shown.concat(data.tasks) : data.tasks;
        fillTable(table, shown.map(row), "No task in the history matches.");
        more.hidden = !data.more;
        setText("history-note", "Newest activity first · " + fmtInt(shown.length) + " shown.");
        setStatus(true, "history");
      } catch (error) {
        fillTable(table, [], error.message);
        setStatus(false, error.status === 503 ? "history unreachable" : "error");
      }
    }
    more.addEventListener("click", () => load(true));
    load(false);
    const wanted = byId("history-task").dataset.taskId;
    if (wanted) showHistoryTask(wanted, null);
  }

  // -- workers ---------------------------------------------------------------------

  function renderWorkers(data) {
    const now = data.time;
    fillTable(
      byId("workers-full"),
      data.workers.map((worker) =>
        el(
          "tr",
          {},
          el("td", { class: "strong" }, worker.consumer),
          el("td", {}, worker.host || "–"),
          num(worker.pid || "–"),
          el(
            "td",
            {},
            ...(worker.queues || []).flatMap((name, index) => [
              index ? ", " : null,
              el("a", { href: queueHref(name) }, name),
            ]),
          ),
          num(fmtInt(worker.processes)),
          num(fmtInt(worker.processed)),
          num(fmtInt(worker.failed)),
          num(fmtInt(worker.retried)),
          num(fmtInt(worker.dead), worker.dead ? "bad" : ""),
          num(fmtInt(worker.restarts), worker.restarts ? "warn" : ""),
          el("td", { class: "num", title: fmtTime(worker.started) }, fmtDuration(now - worker.started) + " ago"),
          num(fmtDuration(now - worker.heartbeat) + " ago"),
        ),
      ),
      "No live workers.",
    );
  }

  // -- cron --------------------------------------------------------------------------

  function renderCron(data) {
    const now = data.time;
    fillTable(
      byId("cron"),
      data.entries.map((entry) =>
        el(
          "tr",
          { "data-entry": entry.name },
          el("td", { class: "strong" }, entry.name),
          el("td", {}, entry.tz ? entry.schedule + " (" + entry.tz + ")" : "every " + entry.schedule + " s"),
          el("td", {}, entry.type),
          el("td", {}, el("a", { href: queueHref(entry.queue) }, entry.queue)),
          el("td", { title: fmtTime(entry.next) }, fmtRelative(entry.next, now)),
          el("td", {}, entry.last_tick === null ? "never" : fmtTime(entry.last_tick)),
          el("td", { class: "mono" }, entry.task_id || ""),
          el("td", { class: entry.holder ? "" : "warn" }, entry.holder || "no engine"),
        ),
      ),
      "No cron entries: an engine with cron entries registers them when it starts.",
    );
  }

  // -- start -----------------------------------------------------------------------

  if (page === "overview") poll("/api/overview", renderOverview);
  else if (page === "queue") setupQueue();
  else if (page === "dead") setupDead();
  else if (page === "task") setupTask();
  else if (page === "history") setupHistory();
  else if (page === "workers") poll("/api/workers", renderWorkers);
  else if (page === "cron") poll("/api/cron", renderCron);
  else byId("status").hidden = true;
})();
