// Kiln sandbox bridge. Runs as the main module of one `deno` process that serves one tool
// version; the host (services/worker/src/sandbox) talks to it over stdin/stdout.
//
// Protocol: every frame is one line of JSON. Host -> bridge lines are plain JSON. Bridge -> host
// lines start with the ASCII record separator (0x1e) so that anything else that reaches stdout
// (a library writing through `node:process`, raw ops) is recognisably not a frame; the host turns
// such stray bytes into capped log lines instead of losing the protocol.
//
// Everything the bridge relies on is captured before tool code loads. Tool code runs in this same
// isolate, so it can tamper with the bridge; that only ever hurts its own process (one tool version
// per process, one invocation at a time), and the host enforces every limit that matters.

const RS = "\x1e";
const enc = new TextEncoder();
const dec = new TextDecoder();
const stringify = JSON.stringify;
const parseJson = JSON.parse;
const inspect = Deno.inspect;
const writeSyncRaw = Deno.stdout.writeSync.bind(Deno.stdout);
const readRaw = Deno.stdin.read.bind(Deno.stdin);
const exitProcess = Deno.exit.bind(Deno);
const NotCapable = Deno.errors.NotCapable;
const TOOL_URL = "tool.ts";
const WRAP = "export default async function (args, context, ctx) {";
const EXPR_HEAD = WRAP + "const __kiln_value = (";
const EXPR_TAIL = "\n); return typeof __kiln_value === \"function\" ? __kiln_value(args, ctx) : __kiln_value;}";
const BODY_HEAD = WRAP + "{";
const BODY_TAIL = "\n}}";
const DATA_TS = "data:application/typescript;base64,";
const DATA_URL_RE = /data:application\/(?:typescript|javascript);base64,[A-Za-z0-9+/=]*(?:\.{6}[A-Za-z0-9+/=]*)?/g;
const LOCATION_RE = /:(\d+):(\d+)\)?\s*$/;

// ---- output ---------------------------------------------------------------------------------

function writeBytes(bytes) {
  let off = 0;
  while (off < bytes.length) off += writeSyncRaw(bytes.subarray(off));
}

function send(frame) {
  writeBytes(enc.encode(RS + stringify(frame) + "\n"));
}

// ---- the invocation in flight and its capped log ----------------------------------------------

/** The invocation (or load) whose logs and host calls are live; null between invocations. */
let current = null;

function emitLog(level, text) {
  const inv = current;
  if (inv === null) return; // leftover timers between invocations: nobody is listening
  if (inv.logLeft <= 0) return;
  let msg = String(text);
  if (msg.length > inv.logLeft) {
    msg = msg.slice(0, inv.logLeft);
    inv.logLeft = 0;
    send({ t: "log", id: inv.id, level, msg, truncated: true });
    return;
  }
  inv.logLeft -= msg.length + 1;
  send({ t: "log", id: inv.id, level, msg });
}

function format(args) {
  let out = "";
  for (let i = 0; i < args.length; i++) {
    if (i > 0) out += " ";
    const a = args[i];
    out += typeof a === "string" ? a : inspect(a, { depth: 4, colors: false, iterableLimit: 100 });
    if (current !== null && out.length > current.logLeft) break;
  }
  return out;
}

// ---- sealing the runtime before tool code loads ----------------------------------------------

function seal() {
  const log = (level) => (...args) => emitLog(level, format(args));
  const counts = new Map();
  const timers = new Map();
  globalThis.console = {
    log: log("info"),
    info: log("info"),
    debug: log("debug"),
    trace: log("debug"),
    warn: log("warn"),
    error: log("error"),
    dir: (v) => emitLog("info", format([v])),
    dirxml: log("info"),
    table: (v) => emitLog("info", format([v])),
    assert: (cond, ...args) => {
      if (!cond) emitLog("error", "Assertion failed" + (args.length ? ": " + format(args) : ""));
    },
    count: (label = "default") => {
      const n = (counts.get(label) ?? 0) + 1;
      counts.set(label, n);
      emitLog("info", `${label}: ${n}`);
    },
    countReset: (label = "default") => counts.delete(label),
    time: (label = "default") => timers.set(label, performance.now()),
    timeLog: (label = "default", ...args) =>
      emitLog("info", `${label}: ${(performance.now() - (timers.get(label) ?? 0)).toFixed(3)}ms ${format(args)}`),
    timeEnd: (label = "default") => {
      emitLog("info", `${label}: ${(performance.now() - (timers.get(label) ?? 0)).toFixed(3)}ms`);
      timers.delete(label);
    },
    group: log("info"),
    groupCollapsed: log("info"),
    groupEnd: () => {},
    clear: () => {},
    profile: () => {},
    profileEnd: () => {},
    timeStamp: () => {},
  };
  // Streams are created on first use: constructing one at startup costs ~10 ms of cold start.
  const sink = (level) => {
    let writable;
    return {
      write: (p) => (emitLog(level, dec.decode(p)), Promise.resolve(p.length)),
      writeSync: (p) => (emitLog(level, dec.decode(p)), p.length),
      get writable() {
        return (writable ??= new WritableStream({ write: (chunk) => emitLog(level, dec.decode(chunk)) }));
      },
      close() {},
      isTerminal: () => false,
    };
  };
  Deno.stdout = sink("info");
  Deno.stderr = sink("error");
  Deno.stdin = {
    read: () => Promise.resolve(null),
    readSync: () => null,
    get readable() {
      return new ReadableStream({ start: (c) => c.close() });
    },
    close() {},
    isTerminal: () => false,
    setRaw() {},
  };
  Deno.exit = () => {
    throw new Error("Deno.exit is not available to Kiln tools; return a value or throw an error instead");
  };
  const denied = (what, why) => () => {
    throw new NotCapable(`Requires ${what} access: ${why}`);
  };
  const worker = denied("worker", "Kiln tools cannot spawn Workers");
  globalThis.Worker = function Worker() {
    worker();
  };
  // Web storage would persist under DENO_DIR, keyed by the bridge (shared by every tool).
  for (const name of ["localStorage", "caches"]) {
    Object.defineProperty(globalThis, name, {
      get: denied("storage", `${name} is not available to Kiln tools`),
      configurable: false,
    });
  }
  // An unhandled rejection or uncaught error in a leftover callback must not kill the process.
  globalThis.addEventListener("unhandledrejection", (e) => {
    e.preventDefault();
    emitLog("error", "Unhandled promise rejection: " + describe(e.reason).message);
  });
  globalThis.addEventListener("error", (e) => {
    e.preventDefault();
    emitLog("error", "Uncaught error: " + describe(e.error).message);
  });
}

// ---- errors -------------------------------------------------------------------------------------

function cleanStack(stack) {
  if (typeof stack !== "string") return undefined;
  return stack
    .split("\n")
    .filter((line) => !line.includes("data:application/javascript;base64,"))
    .join("\n")
    .replace(DATA_URL_RE, TOOL_URL)
    .replace(/tool\.ts:1:(\d+)/g, (_, c) => `${TOOL_URL}:1:${Math.max(1, Number(c) - (current?.prefixLen ?? 0))}`);
}

function repr(v) {
  try {
    const s = typeof v === "string" ? stringify(v) : inspect(v, { depth: 2, colors: false });
    return s.length > 1000 ? s.slice(0, 1000) + "..." : s;
  } catch {
    return String(typeof v);
  }
}

/** Plain data describing a thrown value; the host classifies it. */
function describe(e) {
  try {
    if (e instanceof Error || (e !== null && typeof e === "object" && typeof e.message === "string")) {
      let permission = false;
      if (/Blocked by null entry for ""?file:|Import "\.{0,2}\/[^"]*" not a dependency/.test(String(e.message))) {
        permission = "Requires read access: Kiln tools cannot import local files";
      }
      for (let c = e, depth = 0; c && !permission && depth < 5; c = c.cause, depth++) {
        if (c instanceof NotCapable || c?.name === "NotCapable" || c?.name === "PermissionDenied") {
          permission = String(c.message);
          break;
        }
      }
      return {
        name: String(e.name ?? "Error"),
        message: String(e.message).replace(DATA_URL_RE, TOOL_URL),
        stack: cleanStack(e.stack),
        permission: permission || undefined,
        timeout: e.name === "TimeoutError" || undefined,
      };
    }
    return { nonError: true, message: repr(e) };
  } catch (inner) {
    return { nonError: true, message: "unprintable thrown value (" + String(inner) + ")" };
  }
}

// ---- results as JSON ------------------------------------------------------------------------------

const NOT_JSON = Symbol("not json");
const TOO_BIG = Symbol("too big");

/** Where in `value` the first non-JSON thing sits, as `$.a[0].b`, and what it is. */
function findNonJson(value) {
  const ancestors = [];
  const paths = [];
  function walk(v, key, path) {
    if (v !== null && typeof v === "object" && typeof v.toJSON === "function") v = v.toJSON(key);
    switch (typeof v) {
      case "bigint":
        return `${path} is a BigInt; convert it with String(n) or Number(n)`;
      case "function":
        return `${path} is a function`;
      case "symbol":
        return `${path} is a Symbol`;
      case "object": {
        if (v === null) return null;
        if (v instanceof Map || v instanceof Set) {
          return `${path} is a ${v instanceof Map ? "Map" : "Set"}; convert it with Object.fromEntries(m) or [...s]`;
        }
        const at = ancestors.indexOf(v);
        if (at >= 0) return `${path} is a circular reference (back to ${paths[at]})`;
        ancestors.push(v);
        paths.push(path);
        const entries = Array.isArray(v) ? v.map((x, i) => [i, x]) : Object.entries(v);
        for (const [k, x] of entries) {
          const p = Array.isArray(v) ? `${path}[${k}]` : /^[A-Za-z_$][\w$]*$/.test(k) ? `${path}.${k}` : `${path}[${stringify(k)}]`;
          const found = walk(x, String(k), p);
          if (found) return found;
        }
        ancestors.pop();
        paths.pop();
        return null;
      }
      default:
        return null;
    }
  }
  return walk(value, "", "$");
}

/** The result as JSON text, or throws {invalidOutput}. Fast path: one native stringify. */
function toJson(value, maxBytes) {
  if (value === undefined) return "null";
  let budget = maxBytes;
  let reason = null;
  const replacer = function (key, v) {
    budget -= key.length;
    switch (typeof v) {
      case "string":
        budget -= v.length;
        break;
      case "bigint":
      case "function":
      case "symbol":
        throw NOT_JSON;
      case "object":
        if (v instanceof Map || v instanceof Set) throw NOT_JSON;
        break;
    }
    if (budget < 0) throw TOO_BIG;
    return v;
  };
  let json;
  try {
    json = stringify(value, replacer);
  } catch (e) {
    if (e === TOO_BIG) reason = `the result is over the limit of ${maxBytes} bytes (limits.maxOutputBytes)`;
    else if (e === NOT_JSON || (e instanceof TypeError && /circular|BigInt/.test(e.message))) {
      reason = "the result is not JSON: " + (findNonJson(value) ?? String(e.message ?? e));
    } else throw e; // a throwing toJSON or getter: the tool's own error
  }
  if (reason === null && json === undefined) reason = "the result is not JSON: $ is " + typeof value;
  if (reason !== null) throw { invalidOutput: reason };
  return json;
}

// ---- loading tool code ------------------------------------------------------------------------------

function dataUrl(src, mime = DATA_TS) {
  return mime + enc.encode(src).toBase64();
}

function looksLikeModule(code) {
  return /^[ \t]*(?:export[\s{*]|import\s*[\w{*"'])/m.test(code);
}

/** The ways `code` may be meant, most specific first, each as an ES module exporting the entry. */
function candidates(code) {
  if (looksLikeModule(code)) return [{ format: "module", src: code, prefixLen: 0 }];
  const expr = code.replace(/[\s;]+$/, "");
  return [
    { format: "expression", src: EXPR_HEAD + expr + EXPR_TAIL, prefixLen: EXPR_HEAD.length },
    { format: "body", src: BODY_HEAD + code + BODY_TAIL, prefixLen: BODY_HEAD.length },
  ];
}

/** A load failure as `{message, line?, column?}` with positions in the tool's own coordinates. */
function codeError(e, prefixLen) {
  const raw = String(e?.message ?? e);
  const lines = raw.split("\n");
  let message = lines[0].replace(/^SyntaxError: /, "");
  let line, column;
  const at = raw.match(/(?:data:[^\s]*?|tool\.ts):(\d+):(\d+)\)?\s*$/) ?? raw.match(LOCATION_RE);
  if (at) {
    line = Number(at[1]);
    column = Number(at[2]);
    if (line === 1) column = Math.max(1, column - prefixLen);
  }
  message = message.replace(/ at data:\S*$/, "").replace(DATA_URL_RE, TOOL_URL);
  const syntax = e?.name === "SyntaxError" || lines[0].startsWith("SyntaxError");
  return { message, line, column, syntax };
}

function isParseFailure(e) {
  return e?.name === "SyntaxError" || String(e?.message ?? "").startsWith("SyntaxError");
}

/** Imports the tool; returns the entry `(args, ctx) => Promise`. Module top-level code runs here. */
async function loadTool(code) {
  const options = candidates(code);
  for (let i = 0; i < options.length; i++) {
    const c = options[i];
    let mod;
    try {
      current.prefixLen = c.prefixLen;
      mod = await import(dataUrl(c.src));
    } catch (e) {
      if (isParseFailure(e) && i < options.length - 1) continue; // not this reading; try the next
      if (isParseFailure(e) || e?.code === "ERR_MODULE_NOT_FOUND") throw { codeInvalid: codeError(e, c.prefixLen) };
      throw e; // module top-level code threw: the tool's own error
    }
    const f = mod.default;
    if (typeof f !== "function") {
      throw {
        codeInvalid: {
          message:
            "a module tool must `export default` a function, e.g. `export default async function (args, ctx) { ... }`" +
            ` (its default export is ${f === undefined ? "missing" : typeof f})`,
        },
      };
    }
    const entry = c.format === "module" ? (args, ctx) => f(args, ctx) : (args, ctx) => f(args, args, ctx);
    return { entry, format: c.format, prefixLen: c.prefixLen };
  }
}

let probeSeq = 0;

/** Parses (and links the imports of) `code` without evaluating any of it. */
async function checkCode(code) {
  const options = candidates(code);
  let failure;
  for (const c of options) {
    // A module that imports the candidate and a name that does not exist fails at link time,
    // after every module in the graph was parsed and before any of them is evaluated.
    const probe =
      `import ${stringify(dataUrl(c.src))};\n` +
      `import { __kiln_never__ } from "data:application/javascript,export%20{}";\n// ${probeSeq++}`;
    try {
      await import(dataUrl(probe, "data:application/javascript;base64,"));
      return { format: c.format }; // unreachable: the link always fails
    } catch (e) {
      if (String(e?.message).includes("__kiln_never__")) {
        if (c.format === "module" && !/\bexport\s+default\b|\bas\s+default\b/.test(code)) {
          return {
            error: {
              message:
                "a module tool must `export default` a function, e.g. `export default async function (args, ctx) { ... }`",
            },
          };
        }
        return { format: c.format };
      }
      failure = codeError(e, c.prefixLen);
      if (!isParseFailure(e)) break; // an import that cannot be resolved: no other reading helps
    }
  }
  return { error: failure };
}

// ---- invocations --------------------------------------------------------------------------------------

let tool = null;
let callSeq = 0;
const pendingCalls = new Map();

function hostCall(inv, method, params) {
  if (current !== inv) return Promise.reject(new Error(`${method}: the invocation has already finished`));
  let json;
  try {
    json = params === undefined ? "null" : toJson(params, 16 << 20);
  } catch (e) {
    return Promise.reject(new TypeError(`${method}: ${e?.invalidOutput ?? e}`.replace("the result", "the argument")));
  }
  const cid = ++callSeq;
  return new Promise((resolve, reject) => {
    pendingCalls.set(cid, { resolve, reject, inv });
    writeBytes(enc.encode(`${RS}{"t":"call","id":${inv.id},"cid":${cid},"method":${stringify(method)},"params":${json}}\n`));
  });
}

/** Base64 of bytes (`Uint8Array`, `ArrayBuffer`); a string is taken as base64 already. */
function toBase64(data) {
  if (typeof data === "string") return data;
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/**
 * `ctx.content(blocks, structured?)`: a result the MCP API sends as explicit content blocks
 * instead of JSON text. Blocks are MCP content objects or strings (text); the helpers build them.
 * The API checks each block and, when the tool declares an outputSchema, `structured` against it.
 */
const CONTENT = Object.freeze(Object.assign(
  function content(blocks, structured) {
    const list = (Array.isArray(blocks) ? blocks : [blocks]).map((b) => (typeof b === "string" ? { type: "text", text: b } : b));
    const out = { "mcp/content": list };
    if (structured !== undefined) out["mcp/structuredContent"] = structured;
    return out;
  },
  {
    text: (text) => ({ type: "text", text: String(text) }),
    image: (data, mimeType) => ({ type: "image", data: toBase64(data), mimeType: String(mimeType) }),
    audio: (data, mimeType) => ({ type: "audio", data: toBase64(data), mimeType: String(mimeType) }),
    /** `{ uri, mimeType?, text }` or `{ uri, mimeType?, blob }` (blob: bytes or base64). */
    resource: (r) => {
      const resource = { uri: String(r.uri) };
      if (r.mimeType !== undefined) resource.mimeType = String(r.mimeType);
      if (r.blob !== undefined) resource.blob = toBase64(r.blob);
      else resource.text = String(r.text ?? "");
      return { type: "resource", resource };
    },
  },
));

function makeCtx(inv, f) {
  return Object.freeze({
    runId: f.runId,
    attempt: f.attempt,
    tool: Object.freeze({ name: tool.name, version: tool.version }),
    signal: inv.controller.signal,
    log(level, msg) {
      const l = ["debug", "info", "warn", "error"].includes(level) ? level : "info";
      emitLog(l, typeof msg === "string" ? msg : format([msg]));
    },
    progress(done, total, message) {
      if (current !== inv || inv.logLeft <= 0) return;
      const frame = { t: "progress", id: inv.id, done: Number(done) };
      if (total !== undefined && total !== null) frame.total = Number(total);
      if (message !== undefined && message !== null) frame.message = String(message).slice(0, 1000);
      if (!Number.isFinite(frame.done) || (frame.total !== undefined && !Number.isFinite(frame.total))) {
        throw new TypeError("ctx.progress(done, total?, message?) takes finite numbers");
      }
      inv.logLeft -= 32 + (frame.message?.length ?? 0);
      send(frame);
    },
    // Host calls: the run layer answers these (durable steps, calling other tools).
    async step(key, fn) {
      const found = await hostCall(inv, "step.lookup", { key: String(key) });
      if (found && found.found) return found.value;
      const value = await fn();
      // The recorded (JSON) value is returned, so a first run and a resumed one see the same thing.
      const recorded = await hostCall(inv, "step.record", { key: String(key), value: value === undefined ? null : value });
      return recorded && typeof recorded === "object" && "value" in recorded ? recorded.value : value;
    },
    // Fails the run without retrying it: for errors another attempt would repeat.
    fail(message) {
      const e = new Error(String(message));
      e.name = "NonRetryableError";
      throw e;
    },
    tools: Object.freeze({
      call: (name, args) => hostCall(inv, "tools.call", { name: String(name), args: args ?? {} }),
    }),
    content: CONTENT,
  });
}

async function invoke(f) {
  const inv = {
    id: f.id,
    controller: new AbortController(),
    logLeft: f.maxLogBytes,
    prefixLen: tool.prefixLen,
  };
  current = inv;
  let out;
  try {
    const value = await tool.entry(f.args, makeCtx(inv, f));
    if (inv.controller.signal.aborted) throw inv.controller.signal.reason;
    const head = `${RS}{"t":"ok","id":${inv.id},"value":`;
    out = enc.encode(head + toJson(value, f.maxOutputBytes) + "}\n");
    const size = out.length - head.length - 2;
    if (size > f.maxOutputBytes) {
      throw { invalidOutput: `the result is ${size} bytes, over the limit of ${f.maxOutputBytes} bytes (limits.maxOutputBytes)` };
    }
  } catch (e) {
    const error = e?.invalidOutput ? { invalidOutput: e.invalidOutput } : describe(e);
    out = enc.encode(RS + stringify({ t: "err", id: inv.id, error }) + "\n");
  }
  for (const [cid, call] of pendingCalls) {
    if (call.inv === inv) {
      pendingCalls.delete(cid);
      call.reject(new Error("the invocation has finished"));
    }
  }
  if (current === inv) current = null;
  writeBytes(out);
}

async function load(f) {
  current = { id: f.id, controller: new AbortController(), logLeft: f.maxLogBytes, prefixLen: 0 };
  try {
    const loaded = await loadTool(f.code);
    tool = { ...loaded, name: f.name, version: f.version };
    current = null;
    send({ t: "loaded", id: f.id, format: loaded.format });
  } catch (e) {
    const error = e?.codeInvalid ? { codeInvalid: e.codeInvalid } : describe(e);
    current = null;
    send({ t: "err", id: f.id, error });
  }
}

async function check(f) {
  const result = await checkCode(f.code);
  if (result.error) send({ t: "checked", id: f.id, error: { codeInvalid: result.error } });
  else send({ t: "checked", id: f.id, format: result.format });
}

function dispatch(f) {
  switch (f.t) {
    case "invoke":
      return void invoke(f);
    case "reply": {
      const call = pendingCalls.get(f.cid);
      if (!call) return;
      pendingCalls.delete(f.cid);
      if (f.error !== undefined) call.reject(new Error(String(f.error)));
      else call.resolve(f.value);
      return;
    }
    case "abort":
      if (current !== null && current.id === f.id) {
        const reason = f.reason === "timeout"
          ? new DOMException("the invocation timed out", "TimeoutError")
          : new DOMException("the invocation was cancelled", "AbortError");
        current.controller.abort(reason);
      }
      return;
    case "load":
      return void load(f);
    case "check":
      return void check(f);
  }
}

async function serve() {
  const buf = new Uint8Array(256 * 1024);
  let parts = [];
  let size = 0;
  for (;;) {
    const n = await readRaw(buf);
    // The host closed stdin or died (even SIGKILLed): stop now, whatever tool code is still
    // awaiting, rather than live on as an orphan.
    if (n === null) exitProcess(0);
    let start = 0;
    for (;;) {
      const nl = buf.subarray(start, n).indexOf(10);
      if (nl < 0) break;
      let line = buf.subarray(start, start + nl);
      if (parts.length > 0) {
        const whole = new Uint8Array(size + line.length);
        let off = 0;
        for (const p of parts) {
          whole.set(p, off);
          off += p.length;
        }
        whole.set(line, off);
        line = whole;
        parts = [];
        size = 0;
      }
      start += nl + 1;
      dispatch(parseJson(dec.decode(line)));
    }
    if (start < n) {
      parts.push(buf.slice(start, n));
      size += n - start;
    }
  }
}

seal();
send({ t: "ready" });
await serve();
