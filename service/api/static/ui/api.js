// The v1 JSON API, as the console calls it: the key goes in the X-API-Key header of each request, never in a
// URL; it lives in this module (memory) unless the user asks to remember it (localStorage).

const REMEMBERED = "calibserve.key";
export const root = document.documentElement.dataset.root || "";

let key = null;
try {
  key = window.localStorage.getItem(REMEMBERED);
} catch {
  key = null;
}

export function currentKey() {
  return key;
}

export function isRemembered() {
  try {
    return window.localStorage.getItem(REMEMBERED) !== null;
  } catch {
    return false;
  }
}

export function setKey(value, remember) {
  key = value || null;
  try {
    if (remember && key) window.localStorage.setItem(REMEMBERED, key);
    else window.localStorage.removeItem(REMEMBERED);
  } catch {
    // storage refused (private mode): the key stays in memory
  }
}

/** An answer of the service that is not a success: its status and the service's own words. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(accept, type) {
  const out = { Accept: accept };
  if (key) out["X-API-Key"] = key;
  if (type) out["Content-Type"] = type;
  return out;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const problem = await response.json();
    message = problem.detail || problem.title || problem.error || message;
  } catch {
    // not problem+json: the status line says it
  }
  return new ApiError(response.status, message);
}

/** fetch() of ``path`` under the service's root with the key; throws ApiError on any status >= 400. */
export async function call(method, path, { body, type, accept = "application/json" } = {}) {
  const response = await fetch(root + path, {
    method,
    headers: headers(accept, body === undefined ? null : type || "application/json"),
    body,
    credentials: "omit",
    cache: "no-store",
  });
  if (!response.ok) throw await failure(response);
  return response;
}

export async function json(method, path, options = {}) {
  const response = await call(method, path, options);
  return response.status === 204 ? null : response.json();
}

export const get = (path) => json("GET", path);

/** The role of the key held (null: none, or not valid) and whether the service wants one. */
export async function session() {
  return json("GET", "/ui/session");
}

/** A request whose upload reports progress (fetch cannot): ``onProgress(fraction)`` while the body is sent,
 * ``onProgress(null)`` once it is all sent and the service works on it. */
export function upload(method, path, body, type, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open(method, root + path);
    for (const [name, value] of Object.entries(headers("application/json", type))) {
      request.setRequestHeader(name, value);
    }
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.upload.addEventListener("load", () => onProgress(null));
    request.addEventListener("load", () => {
      let answer = null;
      try {
        answer = JSON.parse(request.responseText);
      } catch {
        answer = null;
      }
      if (request.status >= 200 && request.status < 300) resolve(answer);
      else {
        const message = (answer && (answer.detail || answer.title)) || `${request.status} ${request.statusText}`;
        reject(new ApiError(request.status, message));
      }
    });
    request.addEventListener("error", () => reject(new ApiError(0, "the service could not be reached")));
    request.send(body);
  });
}

export const modelPath = (name) => `/v1/models/${encodeURIComponent(name)}`;
