// Building DOM nodes and formatting numbers: the pages make their markup with `el`, never with
// innerHTML, so text from the server is always text.

/** `el('a', {href: '#/jobs', class: 'x'}, 'text', child)`; `on*` attributes become listeners. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attrs);
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/** The same for SVG elements. */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttributes(node, attrs);
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function setAttributes(node, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
}

/** 1536 → "1.5 kB" (powers of 1000, as the report gives sizes). */
export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = Number(n);
  let unit = 0;
  while (Math.abs(value) >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

/** A number with `digits` significant digits, or a dash. */
export function num(n, digits = 4) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  if (Number.isInteger(n) && Math.abs(n) < 1e6) return String(n);
  return Number(n).toPrecision(digits);
}

/** ISO time → local "YYYY-MM-DD HH:MM:SS". */
export function time(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  const pad = (v) => String(v).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A status word as a coloured badge. */
export function badge(status) {
  return el('span', { class: `badge status-${status}` }, status);
}

/** A message box: `kind` is `error`, `ok` or `info`. */
export function notice(kind, ...children) {
  return el('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, ...children);
}

/** An API error for a person: a missing or weak key says what to do about it. */
export function errorNotice(error) {
  if (error.status === 401) {
    return notice('error', el('strong', {}, 'This server needs an API key. '),
      'Enter one above (compressd keys create). ', el('small', {}, error.message));
  }
  if (error.status === 403) {
    return notice('error', el('strong', {}, 'The key may not do this. '), error.message);
  }
  return notice('error', error.message || String(error));
}
