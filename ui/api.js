// Talking to /v1: the key kept in localStorage and sent as a bearer token, problem+json errors,
// the job event stream read with fetch (EventSource cannot send the key) and downloads.

const KEY_STORAGE = 'compressd.apiKey';

export function storedKey() {
  return localStorage.getItem(KEY_STORAGE) || '';
}

export function storeKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** An error answer of the API (RFC 9457), or a network failure (`status` 0). */
export class ApiProblem extends Error {
  constructor(status, body) {
    const detail = body.detail || body.title || `HTTP ${status}`;
    super(body.pointer ? `${detail} (at ${body.pointer})` : detail);
    this.status = status;
    this.body = body;
  }

  get needsKey() {
    return this.status === 401;
  }
}

/** `fetch` against this server with the stored key; non-2xx answers throw an ApiProblem. */
export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = storedKey();
  if (key) headers.set('Authorization', `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiProblem(0, { detail: `the server cannot be reached (${error.message})` });
  }
  if (!response.ok) {
    let body = {};
    try {
      body = await response.json();
    } catch {
      body = { detail: `HTTP ${response.status} ${response.statusText}` };
    }
    throw new ApiProblem(response.status, body);
  }
  return response;
}

export async function getJson(path, options) {
  return (await apiFetch(path, options)).json();
}

export async function postJson(path, body) {
  const response = await apiFetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  return response.json();
}

/** A multipart POST (model and dataset uploads). */
export async function postForm(path, formData) {
  return (await apiFetch(path, { method: 'POST', body: formData })).json();
}

/**
 * Reads server-sent events from a fetch body: yields `{id, event, data}` per record.
 * Lines end in LF, CRLF or CR; `:` lines are comments (keep-alives).
 */
export async function* sseRecords(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let record = { id: null, event: 'message', data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === '') {
        if (record.data.length > 0) yield { ...record, data: record.data.join('\n') };
        record = { id: record.id, event: 'message', data: [] };
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? '' : line.slice(colon + 1);
      if (text.startsWith(' ')) text = text.slice(1);
      if (field === 'data') record.data.push(text);
      else if (field === 'id') record.id = text;
      else if (field === 'event') record.event = text;
    }
  }
}

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);

/**
 * Follows a job's events until its terminal event: `onEvent(view)` for each event (an EventView:
 * seq, type, payload), `onState('live' | 'reconnecting' | 'ended' | 'error', detail)`. A dropped
 * connection is resumed from the last seq seen with `Last-Event-ID`, after a growing pause.
 */
export async function followJob(jobId, { onEvent, onState, signal }) {
  let lastSeq = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const headers = { Accept: 'text/event-stream' };
      if (lastSeq !== null) headers['Last-Event-ID'] = String(lastSeq);
      const response = await apiFetch(`/v1/jobs/${jobId}/events`, { headers, signal });
      onState('live');
      failures = 0;
      for await (const record of sseRecords(response.body)) {
        const view = JSON.parse(record.data);
        if (record.id !== null) lastSeq = Number(record.id);
        onEvent(view);
        if (TERMINAL.has(view.type)) {
          onState('ended');
          return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiProblem && error.status >= 400 && error.status < 500 && error.status !== 429) {
        onState('error', error.message);
        return;
      }
    }
    failures += 1;
    onState('reconnecting');
    await sleep(Math.min(500 * 2 ** failures, 15000), signal);
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/**
 * Downloads an artifact. Without a key a plain link does (and follows a presigned redirect);
 * with one the file is fetched with the key and saved from a blob, since links cannot carry
 * headers.
 */
export async function download(jobId, name) {
  const path = `/v1/jobs/${jobId}/artifacts/${name.split('/').map(encodeURIComponent).join('/')}`;
  const filename = name.split('/').pop();
  let href = path;
  let blobUrl = null;
  if (storedKey()) {
    const blob = await (await apiFetch(path)).blob();
    blobUrl = URL.createObjectURL(blob);
    href = blobUrl;
  }
  const link = document.createElement('a');
  link.href = href;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  if (blobUrl) setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
}
